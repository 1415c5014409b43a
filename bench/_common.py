"""Shared helpers for benchmarks: strict argument parsing, the final JSON line, peak memory.

Peak CPU memory is measured in a fresh subprocess per configuration so allocator state (and
glibc's retained heap) cannot leak from one model into the next.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Sequence

log = logging.getLogger("ossnet_bench")

_MB = 1024.0 * 1024.0


def setup_logging(level: int = logging.INFO) -> None:
    """Human-readable progress on stderr (stdout is reserved for the result line)."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick`` flag; unknown flags are errors."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="small sizes: finishes in about a minute on 2 cores")
    return parser


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """Replace NaN/inf (invalid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def emit_result(result: dict[str, Any]) -> None:
    """Print ``result`` as one JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(_clean(result), default=_json_default, sort_keys=False) + "\n")
    sys.stdout.flush()


def serve_worker(work: Callable[[dict[str, Any]], dict[str, Any]], payload: str, log: logging.Logger,
                 traceback_level: int = logging.ERROR) -> int:
    """The ``--worker PAYLOAD`` side of ``run_worker``: run ``work`` on the JSON payload and emit
    its result, or an ``{"error": ...}`` object (traceback logged at ``traceback_level``).

    Returns:
        The worker process's exit code: 0, or 1 when ``work`` raised.
    """
    try:
        emit_result(work(json.loads(payload)))
    except Exception as exc:  # the driver reads the error from the result line and goes on
        log.log(traceback_level, "worker failed", exc_info=True)
        emit_result({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


def parse_result_line(stdout: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a benchmark's stdout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("benchmark output: no result line on stdout")
    value = json.loads(lines[-1])
    if not isinstance(value, dict):
        raise ValueError("benchmark output: the last line is not a JSON object")
    return value


# --------------------------------------------------------------------------- memory, /proc


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_mb() -> float:
    """Current resident set size of this process in MiB (0 where /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024.0


def mem_available_mb() -> float:
    """``MemAvailable`` from /proc/meminfo in MiB (inf where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", fh.read(), flags=re.MULTILINE)
    except OSError:
        return math.inf
    return int(match.group(1)) / 1024.0 if match else math.inf


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    # The reset worked if the peak now sits at (about) the current RSS.
    return hwm is not None and rss is not None and hwm <= rss + 1024


class PeakRSS:
    """Context manager measuring this process's peak RSS above the RSS at entry, in MiB.

    Uses the kernel's exact high-water mark (VmHWM, reset through /proc/self/clear_refs) when
    the kernel supports resetting it, and otherwise a background thread sampling VmRSS every
    ``interval`` seconds (which can miss short spikes).

    Attributes (after exit):
        baseline_mb: RSS at entry.
        peak_mb: peak RSS inside the block.
        delta_mb: ``peak_mb - baseline_mb``.
        method: "vmhwm" or "sampling".
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_mb(self) -> float:
        return max(self.peak_mb - self.baseline_mb, 0.0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline_mb = rss_mb()
        self.peak_mb = self.baseline_mb
        if _reset_hwm():
            self.method = "vmhwm"
        else:
            self.method = "sampling"
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if self.method == "vmhwm":
            self.peak_mb = max(self.peak_mb, (_status_kb("VmHWM") or 0) / 1024.0)


def pin_cpus(n: int) -> list[int]:
    """Restrict this process (and the processes it starts) to its first ``n`` allowed cores.

    A run "on N CPUs" then has N cores for everything it does, its consumer and its pool's
    parent included; without it, a 1-CPU run borrows the idle cores for them and a 1-to-2-CPU
    ratio understates scaling. Returns the cores used (all of them where affinity is unsupported).
    """
    if not hasattr(os, "sched_setaffinity"):
        return list(range(os.cpu_count() or 1))
    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed[: max(1, int(n))]
    os.sched_setaffinity(0, cores)
    return cores


# --------------------------------------------------------------------------- subprocess workers


@dataclass(frozen=True)
class WorkerOutcome:
    """What a worker subprocess returned.

    Attributes:
        ok: the worker exited 0 and printed a JSON result.
        result: its JSON result (empty when not ok).
        returncode: exit status (negative: killed by that signal; -9 is usually the OOM killer).
        error: one line saying what went wrong (empty when ok).
        seconds: wall time of the subprocess.
    """

    ok: bool
    result: dict[str, Any]
    returncode: int
    error: str
    seconds: float


def run_worker(
    module: str, payload: dict[str, Any], timeout: float | None = None, extra_args: Sequence[str] = ()
) -> WorkerOutcome:
    """Run ``python -m <module> --worker '<payload json>'`` in a fresh process.

    The worker's stderr passes through (progress stays visible); its last stdout line must be a
    JSON object. Never raises for a failed worker: the outcome says what happened.
    """
    cmd = [sys.executable, "-m", module, *extra_args, "--worker", json.dumps(payload)]
    start = time.perf_counter()
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return WorkerOutcome(False, {}, -1, f"timed out after {timeout:.0f} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        why = f"exit status {proc.returncode}"
        if proc.returncode == -9:
            why = "killed by SIGKILL (probably out of memory)"
        try:
            # A worker that caught its own error says what it was in an {"error": ...} line.
            why = str(parse_result_line(proc.stdout).get("error") or why)
        except ValueError:
            pass
        return WorkerOutcome(False, {}, proc.returncode, why, seconds)
    try:
        result = parse_result_line(proc.stdout)
    except ValueError as exc:
        return WorkerOutcome(False, {}, proc.returncode, str(exc), seconds)
    return WorkerOutcome(True, result, 0, "", seconds)


def round_mb(value: float | None, digits: int = 1) -> float | None:
    """Round a MiB figure for the report (None and non-finite values become None)."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


__all__ = [
    "PeakRSS",
    "WorkerOutcome",
    "emit_result",
    "make_parser",
    "mem_available_mb",
    "parse_result_line",
    "pin_cpus",
    "round_mb",
    "rss_mb",
    "run_worker",
    "serve_worker",
    "setup_logging",
]
