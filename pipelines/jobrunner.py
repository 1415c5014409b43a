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

The flags the commands share live here too: ``--config``, repeatable ``--set KEY=VALUE``, the
dedicated flags that set one config key (:class:`OverrideFlag`, e.g. ``--epochs``), the tracking
flags, and ``--config-json`` / ``--address`` / ``--dry-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TextIO

from ossnet.config import ConfigError
from ossnet_pipelines.jobconfig import apply_overrides, load_yaml, parse_override

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

AnyJob = Any  # a TrainJob, TuneJob or InferJob (ossnet_pipelines.jobconfig.Job)
Handler = Callable[[argparse.Namespace, AnyJob, TextIO], int]


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
    build: Callable[[argparse.Namespace], AnyJob]
    run: Handler
    submit_argv: Callable[[argparse.Namespace, AnyJob, TextIO], list[str]]
    dry_run: Handler | None = None
    bad_input: tuple[type[BaseException], ...] = ()
    hint: Callable[[AnyJob, BaseException], str] | None = None


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


class JobIncomplete(RuntimeError):
    """A job stopped for a reason its one-line message explains fully, with what to do next
    (exit 1, no traceback): e.g. training finished but the tracking server was gone."""


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
    except JobIncomplete as exc:
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the command reports any failure in one line
        logger.exception("%s failed", command.what)
        err.write(f"error: {command.what} failed: {type(exc).__name__}: {_first_line(exc)}\n")
        return EXIT_FAILED


class _NoConst:
    """Marks an :class:`OverrideFlag` that takes a value (not a ``store_const`` flag)."""

    def __repr__(self) -> str:
        return "NO_CONST"


NO_CONST = _NoConst()


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class OverrideFlag:
    """A dedicated command-line flag that sets one config key (sugar for ``--set key=value``).

    Attributes:
        flag: e.g. ``"--epochs"``.
        key: dotted config key, e.g. ``"train.epochs"``.
        type: argparse type (``int``, ``float``, ``str``) or ``bool`` for a
            ``--flag/--no-flag`` pair.
        help: help text.
        const: for ``store_const`` flags (e.g. ``--no-mlflow`` sets ``tracking.enabled=False``).
    """

    flag: str
    key: str
    type: Any = str
    help: str = ""
    const: Any = NO_CONST

    @property
    def dest(self) -> str:
        return "override_" + self.key.replace(".", "__")


def add_config_arguments(parser: argparse.ArgumentParser, flags: Sequence[OverrideFlag] = (), *,
                         config_required: bool = False, set_example: str = "train.lr=1e-3") -> None:
    """Add ``--config``, repeatable ``--set KEY=VALUE`` (``set_example``: a key of this job) and
    the dedicated override ``flags``."""
    parser.add_argument("--config", "-c", metavar="YAML", required=config_required, help="job config file")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help=f"override a config key (repeatable), e.g. --set {set_example}")
    for f in flags:
        if f.const is not NO_CONST:
            parser.add_argument(f.flag, dest=f.dest, action="store_const", const=f.const, default=None, help=f.help)
        elif f.type is bool:
            parser.add_argument(f.flag, dest=f.dest, action=argparse.BooleanOptionalAction, default=None, help=f.help)
        else:
            metavar = f.key.rsplit(".", 1)[-1].upper()
            parser.add_argument(f.flag, dest=f.dest, type=f.type, default=None, metavar=metavar, help=f.help)


def overrides_from_args(args: argparse.Namespace, flags: Sequence[OverrideFlag] = ()) -> list[tuple[str, Any]]:
    """The overrides of a parsed command line: ``--set`` items first, then the dedicated flags."""
    out: list[tuple[str, Any]] = [parse_override(s) for s in getattr(args, "overrides", None) or []]
    for f in flags:
        value = getattr(args, f.dest, None)
        if value is not None:
            out.append((f.key, value))
    return out


#: The MLflow flags shared by ``ossnet train`` and ``ossnet tune`` (both take a training job).
TRACKING_FLAGS: tuple[OverrideFlag, ...] = (
    OverrideFlag("--tracking-uri", "tracking.uri", str,
                 "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else .ossnet/mlflow.db)"),
    OverrideFlag("--experiment", "tracking.experiment", str, "MLflow experiment"),
    OverrideFlag("--model-name", "tracking.model_name", str, "registered model name"),
    OverrideFlag("--system-metrics", "tracking.system_metrics", bool,
                 "log the training process's CPU, memory, disk, network and GPU use as system/* metrics"),
)


def add_submission_arguments(parser: argparse.ArgumentParser, what: str, *, dry_run: bool = True) -> None:
    """``--config-json`` (the whole ``what`` as JSON, how ``--address`` submits it), ``--address``
    and (``dry_run``) ``--dry-run``."""
    parser.add_argument("--config-json", metavar="JSON", help=f"the whole {what} as JSON (what --address submits)")
    parser.add_argument("--address", metavar="URL",
                        help="submit to this Ray cluster's Jobs API (e.g. http://127.0.0.1:8275) instead of running "
                             "here; local paths are made absolute first")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help=f"validate and print the resolved {what}, then exit")


def config_from_args(args: argparse.Namespace, flags: Sequence[OverrideFlag] = (), *,
                     leading: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The job mapping of a parsed command line: ``--config`` YAML or ``--config-json``, with
    ``leading`` (e.g. a positional argument), then the ``--set`` items and the dedicated
    ``flags`` applied.

    Raises:
        ConfigError: both sources given, or JSON that does not parse.
    """
    config_json = getattr(args, "config_json", None)
    if config_json and args.config:
        raise ConfigError("--config and --config-json are mutually exclusive")
    data = load_yaml(args.config) if args.config else {}
    if config_json:
        try:
            data = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json: not valid JSON ({exc})") from None
    return apply_overrides(data, [*leading, *overrides_from_args(args, flags)])


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "JobCommand",
    "OverrideFlag",
    "TRACKING_FLAGS",
    "add_config_arguments",
    "add_submission_arguments",
    "config_from_args",
    "overrides_from_args",
    "run_job_command",
    "sigterm_as_interrupt",
]
