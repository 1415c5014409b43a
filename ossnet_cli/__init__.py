"""The ``ossnet`` command line: one thin subcommand per pipeline stage.

This package sits above ``pipelines`` and ``tune`` and is the only one importing both: the
registry below names their CLI modules. Every subcommand parses strictly (an unknown flag is an error) and calls a Python API
function that the tests call directly. Heavy imports happen inside the handlers so that
``ossnet --help`` stays fast. ``ossnet --dry-run COMMAND ...`` parses and validates a command
without running it (:func:`dry_run`; the deployment tests run it on every RayJob entrypoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from typing import Any, Callable, Sequence, TextIO

Handler = Callable[[argparse.Namespace], int]
#: ``p.set_defaults(validate=fn)``: builds and checks the job of a parsed command without
#: running anything (no Ray, no data access, no MLflow); raises with a one-line message.
Validator = Callable[[argparse.Namespace], Any]


def plain_text(doc: str | None) -> str | None:
    """A docstring as a terminal shows it: reStructuredText markup (````code````,
    ``:class:`x```, ``Examples::``) reduced to plain text."""
    if doc is None:
        return None
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One ``ossnet`` subcommand: the module that configures, validates and runs it.

    The module is imported when the parser is built; it keeps its own heavy imports (Ray,
    MLflow, torch) inside its handler so that ``ossnet --help`` stays fast.
    """

    name: str
    module: str
    help: str
    configure: str
    handler: str
    validate: str | None = None
    description: str | None = None  # the --help text; default the module's docstring

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        import importlib

        module = importlib.import_module(self.module)
        p = sub.add_parser(self.name, help=self.help, description=plain_text(self.description or module.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, self.configure)(p)
        defaults: dict[str, Any] = {"handler": getattr(module, self.handler)}
        if self.validate is not None:
            defaults["validate"] = getattr(module, self.validate)
        p.set_defaults(**defaults)


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("quickstart", "ossnet_pipelines.quickstart",
               "synthetic NIfTI -> Zarr store -> Ray Train -> MLflow registry -> batch MISE inference, on this machine",
               "configure_parser", "run_cli"),
    Subcommand("ingest", "ossnet_pipelines.ingest.cli",
               "validate NIfTI archives (BraTS 2020, LiTS, generic) and write them into a Zarr store",
               "configure_ingest_parser", "run_ingest_cli", "job_from_args"),
    Subcommand("train", "ossnet_pipelines.train.cli",
               "train OSS-Net with Ray Train (DDP), checkpoints and MLflow; --address submits to a cluster",
               "configure_train_parser", "run_train_cli", "job_from_args"),
    Subcommand("tune", "ossnet_tune.cli",
               "hyperparameter sweep: Ray Tune + Optuna + ASHA over Ray Train runs, best model registered; "
               "--resume continues, --address submits to a cluster",
               "configure_tune_parser", "run_tune_cli", "job_from_args"),
    Subcommand("infer", "ossnet_pipelines.infer.cli",
               "batch MISE inference over NIfTI archives or a Zarr store with a registered model; "
               "--address submits to a cluster",
               "configure_infer_parser", "run_infer_cli", "job_from_args"),
    Subcommand("jobs", "ossnet_pipelines.jobs",
               "list, follow or stop jobs submitted to a Ray cluster (--address or $RAY_API_SERVER_ADDRESS)",
               "configure_jobs_parser", "run_jobs_cli",
               description="""``ossnet jobs``: the jobs that ``ossnet train/tune/infer --address`` submitted to a Ray cluster.

Examples::

    ossnet jobs list --address http://127.0.0.1:8275
    ossnet jobs logs ossnet-train-... --follow
    ossnet jobs stop ossnet-train-...

The address is the cluster's dashboard URL (default ``$RAY_API_SERVER_ADDRESS``). A cluster with
token authentication needs its token in ``RAY_AUTH_TOKEN`` or in the file named by
``RAY_AUTH_TOKEN_PATH`` (``infra/local-cluster.sh env`` prints both).
"""),
)


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names: its first word that is not a global flag."""
    names = {c.name for c in SUBCOMMANDS}
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ossnet")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser.

    Args:
        argv: the command line it will parse. Only the subcommand it names is configured (its
            module imported); the others are listed by name and help, so ``ossnet --help`` and
            ``ossnet COMMAND --help`` import nothing they do not show. None configures all.
    """
    chosen = _chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="ossnet",
        description="OSS-Net: memory-efficient high-resolution 3D medical segmentation on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"ossnet {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every log line (Ray's too)")
    # dest differs from `train --dry-run` (which also opens the store): a subparser's defaults
    # would otherwise overwrite this flag.
    parser.add_argument(
        "--dry-run", dest="validate_only", action="store_true",
        help="parse the command and validate its config, print what would run, and exit "
        "without starting Ray, reading data or contacting MLflow (`ossnet --dry-run train ...`)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        if argv is None or command.name == chosen:
            command.add_to(sub)
        else:
            sub.add_parser(command.name, help=command.help)
    return parser


#: Command prefixes :func:`parse_entrypoint` accepts before the subcommand.
ENTRYPOINT_PREFIXES: tuple[tuple[str, ...], ...] = (
    ("ossnet",),
    ("python", "-m", "ossnet_cli"),
    ("python3", "-m", "ossnet_cli"),
)


def parse_entrypoint(command: str) -> argparse.Namespace:
    """Parse a shell command line such as a RayJob ``entrypoint`` with the ``ossnet`` parser.

    Args:
        command: ``ossnet <subcommand> ...`` or ``python -m ossnet_cli <subcommand> ...``
            (``ossnet`` may be given as a path), quoted as a POSIX shell would read it.

    Returns:
        The parsed arguments, with ``raw_argv`` set to the words after the prefix.

    Raises:
        ValueError: the command is not an ``ossnet`` command, or the parser rejects it
            (argparse has already printed its usage message to stderr).
    """
    words = shlex.split(command)
    if words and os.path.basename(words[0]) == "ossnet":
        words[0] = "ossnet"
    for prefix in ENTRYPOINT_PREFIXES:
        if tuple(words[: len(prefix)]) == prefix:
            argv = words[len(prefix):]
            break
    else:
        raise ValueError(f"{command!r}: not an ossnet command (expected 'ossnet ...' or 'python -m ossnet_cli ...')")
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        raise ValueError(f"{command!r}: rejected by the ossnet parser (exit {exc.code})") from None
    args.raw_argv = argv
    return args


def _describe(job: Any) -> str:
    """YAML of a validated job (its run name too when it has one)."""
    to_dict = getattr(job, "to_dict", None)
    if not callable(to_dict):
        return f"{job!r}\n"
    import yaml

    text = yaml.safe_dump(to_dict(), sort_keys=False, default_flow_style=False)
    # Derived names (TrainJob.run_name, TuneJob.name) decide what a re-run resumes: show them.
    for attr, label in (("run_name", "run name"), ("name", "name")):
        if isinstance(getattr(type(job), attr, None), property):
            return text + f"# {label}: {getattr(job, attr)}\n"
    return text


def dry_run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``ossnet --dry-run COMMAND ...``: validate a parsed command without running it.

    Calls the validator the subcommand registered (``p.set_defaults(validate=fn)``), which builds
    the job from the command line and its config file and checks every field. Nothing touches
    Ray, the data or MLflow, so paths that exist only on a cluster (``s3://...``, a volume) are
    fine: ``ossnet train --dry-run`` is the stricter check that also opens the store.

    Returns:
        0 and the resolved job on ``out`` when valid; 2 and a one-line ``error:`` on ``err``.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    command = getattr(args, "command", "?")
    validate: Validator | None = getattr(args, "validate", None)
    if validate is None:
        out.write(f"# ossnet {command}: arguments parsed; this command has no config to validate\n")
        return 0
    try:
        job = validate(args)
    except Exception as exc:  # noqa: BLE001 - any validation failure is reported in one line
        lines = str(exc).strip().splitlines()
        err.write(f"error: ossnet {command}: {lines[0] if lines else type(exc).__name__}\n")
        return 2
    raw = list(getattr(args, "raw_argv", None) or [command])
    at = raw.index(command) if command in raw else 0
    # Only the top-level flag goes: `train --dry-run` after the subcommand is part of the command.
    shown = shlex.join(["ossnet", *[a for a in raw[:at] if a != "--dry-run"], *raw[at:]])
    out.write(f"# valid; would run: {shown}\n# nothing was started (dry run)\n")
    out.write(_describe(job))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ossnet`` console script; returns the process exit code."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(raw_argv)
    args = parser.parse_args(raw_argv)
    # Handlers that resubmit themselves to a cluster (--address) need the exact command line.
    args.raw_argv = raw_argv
    if not args.verbose and not sys.stderr.isatty():
        # MLflow's download bars are a line per update in a log file.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.validate_only:
        return dry_run(args)
    handler: Handler = args.handler
    return int(handler(args) or 0)
