"""One progress reporter and one set of report counts for the jobs that work through a list of
cases (ingest, batch inference) or trials (a sweep)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

CONSOLE_LINES = 10  # progress lines a job logs by default, whatever its length


def log_every(total: int, lines: int = CONSOLE_LINES) -> int:
    """Log every this many items (cases, trials, epochs) so that ``total`` items give about
    ``lines`` lines."""
    return max(1, math.ceil(total / lines))


class CaseCounts:
    """Counts of a job report whose ``cases`` each carry a ``status`` ("ok", "ingested",
    "skipped", "failed"...): mixed into the ingest and inference reports."""

    cases: tuple[Any, ...]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cases)

    @property
    def failed(self) -> tuple[Any, ...]:
        return tuple(c for c in self.cases if c.status == "failed")

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed


class CaseProgress:
    """Shows how far a job through its cases (or trials) is.

    In a terminal (stderr is a TTY) it draws one progress bar (``tqdm``: done/total, rate, eta,
    failed items, a note such as the best score so far); otherwise (a log file, a Ray job's log,
    CI) it logs ``<job>: done/total cases (n failed), rate cases/s, eta[, note]`` every ``every``
    items (default: about ten lines per run), every ``interval_s`` seconds, and at the end.

    Args:
        job: the prefix of each line ("ingest", "infer", "sweep").
        total: items to do.
        every: log every this many items (0: ``ceil(total / 10)``).
        interval_s: log at least this often while items finish.
        bar: draw a bar (default: when stderr is a terminal).
        stream: where the bar goes (default stderr).
        unit: what an item is called ("case", "trial").
    """

    def __init__(self, job: str, total: int, every: int = 0, interval_s: float = 15.0, *,
                 bar: bool | None = None, stream: Any = None, unit: str = "case") -> None:
        self.job = job
        self.unit = unit
        self.total = int(total)
        self.every = every if every > 0 else log_every(self.total)
        self.interval_s = float(interval_s)
        self.done = self.failed = 0
        self.note = ""
        self.t0 = self._last = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = None
        if bar and self.total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=job, unit=unit, file=stream, dynamic_ncols=True, leave=True)

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, failed: bool = False) -> None:
        """Count one finished item (``failed`` or not): advance the bar, or log a line when one is due."""
        self.update_to(self.done + 1, self.failed + bool(failed))

    def update_to(self, done: int, failed: int, note: str | None = None) -> None:
        """Set the counts (a job that reads them off its own state, e.g. Tune's trial list)."""
        step = done - self.done
        changed = step > 0 or failed != self.failed or (note is not None and note != self.note)
        self.done, self.failed = done, failed
        if note is not None:
            self.note = note
        if self._bar is not None:
            if changed:
                parts = [f"failed={self.failed}"] if self.failed else []
                self._bar.set_postfix_str(", ".join([*parts, *([self.note] if self.note else [])]), refresh=False)
                self._bar.update(max(step, 0))
                if step <= 0:
                    self._bar.refresh()
            if self.done >= self.total:
                self.close()
            return
        if step <= 0:
            return
        now = time.perf_counter()
        due = self.done // self.every > (self.done - step) // self.every
        if due or self.done >= self.total or now - self._last > self.interval_s:
            self._last = now
            rate = self.rate
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            logger.info("%s: %d/%d %ss done (%d failed), %.3f %ss/s, eta %.0f s%s", self.job, self.done,
                        self.total, self.unit, self.failed, rate, self.unit, eta,
                        f", {self.note}" if self.note else "")

    def close(self) -> None:
        """End the bar (a job that stops early); nothing to do for log lines."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["CONSOLE_LINES", "CaseProgress", "log_every"]
