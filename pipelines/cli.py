"""The ``ossnet`` command line: one thin subcommand per pipeline stage.

Every subcommand parses strictly (an unknown flag is an error) and calls a Python API
function that the tests call directly. Heavy imports happen inside the handlers so that
``ossnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    from pipelines import quickstart

    p = sub.add_parser(
        "quickstart",
        help="generate synthetic cases, train OSS-Net C, run MISE inference, print Dice/IoU",
        description=quickstart.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quickstart.configure_parser(p)
    p.set_defaults(handler=quickstart.run_cli)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    from pipelines import ingest

    p = sub.add_parser(
        "ingest",
        help="validate NIfTI archives (BraTS 2020, LiTS, generic) and write them into a Zarr store",
        description=ingest.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ingest.configure_ingest_parser(p)
    p.set_defaults(handler=ingest.run_ingest_cli)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from pipelines.train import cli as train_cli

    p = sub.add_parser(
        "train",
        help="train OSS-Net with Ray Train (DDP), checkpoints and MLflow; --address submits to a cluster",
        description=train_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_cli.configure_train_parser(p)
    p.set_defaults(handler=train_cli.run_train_cli)


def _add_infer(sub: argparse._SubParsersAction) -> None:
    from pipelines.infer import cli as infer_cli

    p = sub.add_parser(
        "infer",
        help="batch MISE inference over NIfTI archives or a Zarr store with a registered model; "
        "--address submits to a cluster",
        description=infer_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    infer_cli.configure_infer_parser(p)
    p.set_defaults(handler=infer_cli.run_infer_cli)


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    from pipelines import jobs

    p = sub.add_parser(
        "jobs",
        help="list, follow or stop jobs submitted to a Ray cluster (--address or $RAY_API_SERVER_ADDRESS)",
        description=jobs.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.configure_jobs_parser(p)
    p.set_defaults(handler=jobs.run_jobs_cli)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_quickstart, _add_ingest, _add_train, _add_infer, _add_jobs,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="ossnet",
        description="OSS-Net: memory-efficient high-resolution 3D medical segmentation on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ossnet`` console script; returns the process exit code."""
    parser = build_parser()
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw_argv)
    # Handlers that resubmit themselves to a cluster (--address) need the exact command line.
    args.raw_argv = raw_argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
