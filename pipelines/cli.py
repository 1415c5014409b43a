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


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_quickstart, _add_ingest)


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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
