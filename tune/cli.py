"""``ossnet tune``: a hyperparameter sweep (Ray Tune + Optuna TPE + ASHA) from a YAML config.

Examples::

    ossnet tune --config configs/quickstart-tune.yaml
    ossnet tune --config configs/quickstart-tune.yaml --resume          # after an interruption
    ossnet tune --config configs/brats2020.yaml --set train.validate_every=1 --set space.lr.high=1e-3 --num-samples 32
    ossnet tune --config configs/quickstart-tune.yaml --address http://127.0.0.1:8275   # a Ray job
    ossnet tune --config configs/quickstart-tune.yaml --dry-run

The config is a training config (every trial starts from it) plus ``space``, ``sweep`` and
``scheduler`` sections; all of it, the search space included, is validated before anything
starts. The sweep keeps its state under ``<sweep.storage_path>/<sweep name>``; an interrupted
sweep continues with the same command and ``--resume`` (finished trials are not run again).
At the end it prints the summary table (all trials, best first), registers the best trial's
model, scores it on the store's test split (cases no trial saw) and moves the ``champion``
alias to it only if that test Dice beats the champion's on the same cases. With
``--address`` the resolved sweep is submitted as a Ray job and its log streams here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, TextIO

from ossnet.config import ConfigError
from ossnet_pipelines.jobrunner import (
    TRACKING_FLAGS,
    JobCommand,
    OverrideFlag,
    add_config_arguments,
    add_submission_arguments,
    config_from_args,
    run_job_command,
)

logger = logging.getLogger(__name__)

OVERRIDE_FLAGS: tuple[OverrideFlag, ...] = (
    OverrideFlag("--store", "store", str, "store URL or path"),
    OverrideFlag("--name", "sweep.name", str, "sweep name (default derived from the config: --resume finds it)"),
    OverrideFlag("--num-samples", "sweep.num_samples", int, "trials in all"),
    OverrideFlag("--seed", "sweep.seed", int, "seed of the TPE sampler"),
    OverrideFlag("--max-concurrent", "sweep.max_concurrent_trials", int, "trials at once (default: as resources allow)"),
    OverrideFlag("--storage-path", "sweep.storage_path", str, "where the sweep keeps its state and trial runs"),
    OverrideFlag("--epochs", "train.epochs", int, "epochs of a full trial (ASHA's max_t)"),
    OverrideFlag("--num-workers", "scaling.num_workers", int,
                 "Ray Train workers per trial (0: each trial trains inside its Tune actor)"),
    OverrideFlag("--use-gpu", "scaling.use_gpu", bool, "one GPU per Train worker"),
    *TRACKING_FLAGS,
    OverrideFlag("--no-mlflow", "tracking.enabled", help="do not track in MLflow (no registration)", const=False),
)


def configure_tune_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tune`` flags to ``parser`` (config, overrides, resume, submission)."""
    parser.allow_abbrev = False  # strict: "--num-sample" is an error
    add_config_arguments(parser, OVERRIDE_FLAGS, set_example="space.lr.high=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: run failed trials again")
    add_submission_arguments(parser, "sweep")
    return parser


def job_from_args(args: argparse.Namespace):  # -> TuneJob
    """The ``TuneJob`` a parsed command line describes (validated)."""
    from ossnet_tune.job import TuneJob

    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed: only with --resume")
    return TuneJob.parse(config_from_args(args, OVERRIDE_FLAGS))


def _store_hint(job) -> str:  # job: TuneJob
    store = job.base.store
    if "://" not in store and not Path(store).exists():
        return (f"; create it first: `make quickstart` writes the quickstart store, "
                f"`ossnet ingest --preset {job.base.model.preset}` ingests NIfTI archives")
    return ""


def _print_result(result, job, out: TextIO) -> None:  # result: SweepResult, job: TuneJob
    counts = result.counts
    out.write(f"sweep {result.name}: {len(result.trials)} trials ("
              + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n) + ")\n")
    out.write(result.summary_markdown)
    out.write(f"summary: {result.summary_csv}\n")
    if result.best is None:
        out.write("no trial reported a validation Dice\n")
    else:
        b = result.best
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.settings.items())
        out.write(f"best trial {b.trial_id}: val_dice {b.best_val_dice:.4f} at epoch {b.best_epoch} ({settings})\n")
    if result.parent_run_id:
        out.write(f"MLflow parent run id: {result.parent_run_id}\n")
    if result.test_dice is not None:
        out.write(f"best trial's test Dice {result.test_dice:.4f} on the store's test split (no trial saw it; "
                  "the promotion evidence)\n")
    if result.promotion:
        out.write(f"{result.promotion}\n")
    if counts["unfinished"]:
        out.write("the sweep stopped early: continue it with the same command and --resume\n")


def _dry_run(args: argparse.Namespace, job: Any, out: TextIO) -> int:
    from ossnet_tune.sweep import describe, prepare

    resolved, uri = prepare(job)
    out.write(describe(resolved))
    out.write(f"# tracking: {uri or 'off'}\n")
    return 0


def _submit_argv(args: argparse.Namespace, job: Any, out: TextIO) -> list[str]:
    resolved = job.resolved()
    argv = ["tune", "--config-json", json.dumps(resolved.to_dict())]
    argv += ["--resume"] if args.resume else []
    argv += ["--retry-failed"] if args.retry_failed else []
    out.write(f"submitting sweep {resolved.name} to {args.address}\n")
    return argv


def _run(args: argparse.Namespace, job: Any, out: TextIO) -> int:
    import ossnet_tune.sweep

    # -v: Tune's status tables and every trial result, beside the progress bar or lines.
    result = ossnet_tune.sweep.run_sweep(job, resume=args.resume, retry_failed=args.retry_failed, config_path=args.config,
                                         verbose=2 if getattr(args, "verbose", False) else 1)
    _print_result(result, job, out)
    if result.counts["unfinished"]:
        return 130
    return 0 if result.counts["completed"] + result.counts["early_stopped"] else 1


def _hint(job: Any, exc: BaseException) -> str:
    return _store_hint(job) if str(exc).startswith("store") else ""


TUNE_COMMAND = JobCommand(what="sweep", build=job_from_args, run=_run, submit_argv=_submit_argv, dry_run=_dry_run,
                          hint=_hint)


def run_tune_cli(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Handler of ``ossnet tune``: 0 when the sweep finished and a trial scored, 1 when none did
    (or the sweep failed), 2 for a bad config, 130 when it was interrupted (``--resume`` continues)."""
    return run_job_command(TUNE_COMMAND, args, out, err)


__all__ = ["OVERRIDE_FLAGS", "configure_tune_parser", "job_from_args", "run_tune_cli"]
