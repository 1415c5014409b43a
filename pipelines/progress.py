"""One progress reporter and one set of report counts for the jobs that work through a list of
cases (ingest, batch inference)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

logger = logging.getLogger(__name__)


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
    """Logs ``<job>: done/total cases (n failed), rate cases/s, eta`` every ``every`` cases
    (default: about twenty lines per run), every ``interval_s`` seconds, and at the end.

    Args:
        job: the prefix of each line ("ingest", "infer").
        total: cases to do.
        every: log every this many cases (0: ``ceil(total / 20)``).
        interval_s: log at least this often while cases finish.
    """

    def __init__(self, job: str, total: int, every: int = 0, interval_s: float = 15.0) -> None:
        self.job = job
        self.total = int(total)
        self.every = every if every > 0 else max(1, math.ceil(self.total / 20))
        self.interval_s = float(interval_s)
        self.done = self.failed = 0
        self.t0 = self._last = time.perf_counter()

    @property
    def rate(self) -> float:
        """Cases per second so far."""
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, failed: bool = False) -> None:
        """Count one finished case (``failed`` or not) and log a line when one is due."""
        self.done += 1
        self.failed += bool(failed)
        now = time.perf_counter()
        if self.done % self.every == 0 or self.done == self.total or now - self._last > self.interval_s:
            self._last = now
            rate = self.rate
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            logger.info("%s: %d/%d cases done (%d failed), %.3f cases/s, eta %.0f s", self.job, self.done,
                        self.total, self.failed, rate, eta)


__all__ = ["CaseProgress"]
