"""One runner for the job commands (``ossnet train``, ``tune``, ``infer``).

Each command describes itself as a ``JobCommand`` (how to build its job from the parsed
arguments, how to run it here, what to submit with ``--address``, what its dry run prints);
``run_job_command`` does the rest the same way for all of them:

* exit codes: 0 done, 1 the work failed (``error: <what> failed: <type>: <first line>``, the
  traceback in the log), 2 bad input (config, model, cluster address: ``error: <message>``), or
  what the command's ``run`` returns (a sweep says 130 when interrupted);
* ``--address URL``: the command's own argv is submitted as a Ray job (``ossnet_pipelines.jobs``), its
  logs stream here and its exit status is the job's;
* SIGTERM (``ray job stop``, ``kill``) becomes ``KeyboardInterrupt`` while the job runs, so
  reports and runs are closed cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

from ossnet.config import ConfigError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Job = Any
Handler = Callable[[argparse.Namespace, Job, TextIO], int]


@dataclass(frozen=True)
class JobCommand:
    """How one job command builds, runs, dry-runs and submits its job.

    Attributes:
        what: the work, for failure lines ("training" -> ``error: training failed: ...``).
        build: parsed arguments -> validated job (raises one of ``bad_input`` for bad input).
        run: runs the job here, prints its summary on ``out``, returns the exit code.
        submit_argv: the ``ossnet`` argv to submit for ``--address`` (may print a line on ``out``).
        dry_run: prints what would run (``--dry-run``); None when the command has none.
        bad_input: exceptions reported as bad input (exit 2), besides ``ConfigError``.
        hint: extra text after a bad-input message (e.g. how to create a missing store).
    """

    what: str
    build: Callable[[argparse.Namespace], Job]
    run: Handler
    submit_argv: Callable[[argparse.Namespace, Job, TextIO], list[str]]
    dry_run: Handler | None = None
    bad_input: tuple[type[BaseException], ...] = ()
    hint: Callable[[Job, BaseException], str] | None = None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def run_job_command(command: JobCommand, args: argparse.Namespace, out: TextIO | None = None,
                    err: TextIO | None = None) -> int:
    """Build, then dry-run, submit or run ``command``'s job; returns the process exit code."""
    from ossnet_pipelines.jobs import JobError

    out = out or sys.stdout
    err = err or sys.stderr
    bad_input = (ConfigError, JobError, *command.bad_input)
    job = None
    try:
        job = command.build(args)
        if getattr(args, "dry_run", False) and command.dry_run is not None:
            return command.dry_run(args, job, out)
        address = getattr(args, "address", None)
        if address:
            from ossnet_pipelines import jobs

            argv = command.submit_argv(args, job, out)
            out.flush()
            return jobs.submit_cli_command(address, argv, out=out)
        with sigterm_as_interrupt():
            return command.run(args, job, out)
    except bad_input as exc:
        hint = command.hint(job, exc) if command.hint is not None and job is not None else ""
        err.write(f"error: {exc}{hint}\n")
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the command reports any failure in one line
        logger.exception("%s failed", command.what)
        err.write(f"error: {command.what} failed: {type(exc).__name__}: {_first_line(exc)}\n")
        return EXIT_FAILED


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "JobCommand", "run_job_command", "sigterm_as_interrupt"]
