"""``ossnet train``: train from a YAML config with overrides, locally or on a Ray cluster.

Examples::

    ossnet train --config configs/quickstart.yaml
    ossnet train --config configs/brats2020.yaml --store s3://bucket/brats.zarr --num-workers 4 --use-gpu
    ossnet train --config configs/lits.yaml --set train.lr=1e-4 --set sampling.border_ratio=0.7
    ossnet train --config configs/quickstart.yaml --address http://127.0.0.1:8275   # a Ray job

The whole config is parsed and validated before anything starts. Without ``--address`` the job
runs here: it joins the Ray instance named by ``RAY_ADDRESS`` or starts a local one. With
``--address`` the fully resolved config (absolute local paths, fixed run name) is submitted as a
Ray job through the Jobs API, with the project as its working_dir and ``MLFLOW_TRACKING_URI``
forwarded; its logs stream here and the exit status is the job's. Re-running the same command
resumes the same run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, TextIO

from ossnet_pipelines.jobconfig import dump_yaml
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
    OverrideFlag("--variant", "model.variant", str, "model variant: onet, A, B, C, D"),
    OverrideFlag("--preset", "model.preset", str, "model preset: brats, lits, small, tiny"),
    OverrideFlag("--epochs", "train.epochs", int, "epochs to train in all"),
    OverrideFlag("--batch-size", "train.batch_size", int, "volumes per step over all workers"),
    OverrideFlag("--points", "sampling.n_points", int, "points per volume"),
    OverrideFlag("--lr", "train.lr", float, "learning rate"),
    OverrideFlag("--seed", "train.seed", int, "seed of sampling and initialisation"),
    OverrideFlag("--num-workers", "scaling.num_workers", int, "Ray Train workers (0: in this process)"),
    OverrideFlag("--use-gpu", "scaling.use_gpu", bool, "one GPU per worker, mixed precision"),
    OverrideFlag("--cpus-per-worker", "scaling.resources_per_worker.CPU", float, "logical CPUs per worker (fractions allowed)"),
    OverrideFlag("--max-failures", "scaling.max_failures", int, "worker-group restarts from the last checkpoint"),
    OverrideFlag("--name", "run.name", str, "run name (default derived from the config: re-runs resume)"),
    OverrideFlag("--storage-path", "run.storage_path", str, "Ray Train storage (checkpoints)"),
    *TRACKING_FLAGS,
    OverrideFlag("--no-mlflow", "tracking.enabled", help="do not track in MLflow", const=False),
)


def configure_train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` flags to ``parser`` (config, overrides, submission)."""
    parser.allow_abbrev = False  # strict: "--epoch" is an error, not "--epochs"
    add_config_arguments(parser, OVERRIDE_FLAGS)
    add_submission_arguments(parser, "job")
    return parser


def job_from_args(args: argparse.Namespace):  # -> TrainJob
    """The ``TrainJob`` a parsed command line describes (validated)."""
    from ossnet_pipelines.train.job import TrainJob

    return TrainJob.parse(config_from_args(args, OVERRIDE_FLAGS))


def mlflow_ui_command(uri: str | None) -> str:
    """The shell command that shows a tracking URI's runs (``open URL`` for a server)."""
    if not uri:
        return ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _dry_run(args: argparse.Namespace, job: Any, out: TextIO) -> int:
    from ossnet_pipelines.train.driver import preflight

    resolved, facts, uri = preflight(job)
    out.write(dump_yaml(resolved))
    out.write(f"# run name: {resolved.run_name}\n# train cases: {len(facts.train_cases)}, "
              f"val cases: {len(facts.val_cases)}, test cases: {len(facts.test_cases)}, tracking: {uri or 'off'}\n")
    return 0


def _submit_argv(args: argparse.Namespace, job: Any, out: TextIO) -> list[str]:
    resolved = job.resolved()
    out.write(f"submitting run {resolved.run_name} to {args.address}\n")
    return ["train", "--config-json", json.dumps(resolved.to_dict())]


def _run(args: argparse.Namespace, job: Any, out: TextIO) -> int:
    from ossnet_pipelines.train.driver import train

    result = train(job, config_path=args.config)
    out.write(f"run {result.run_name}: {result.epochs} epochs "
              f"({len(result.executed_epochs)} run now), checkpoints in {result.run_dir}\n")
    if result.best_val_dice is not None:
        out.write(f"best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}\n")
    if result.mlflow_run_id:
        out.write(f"MLflow run id: {result.mlflow_run_id}\n")
    if result.test_dice is not None:
        out.write(f"test Dice {result.test_dice:.4f} on the store's test split (the promotion evidence)\n")
    if result.promotion:
        out.write(f"{result.promotion}\n")
    if result.mlflow_run_id:
        from ossnet_pipelines.tracking import resolve_tracking_uri

        out.write(f"MLflow UI: {mlflow_ui_command(resolve_tracking_uri(job.tracking.uri))}\n")
    return 0


TRAIN_COMMAND = JobCommand(what="training", build=job_from_args, run=_run, submit_argv=_submit_argv, dry_run=_dry_run)


def run_train_cli(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Handler of ``ossnet train``: 0 on success, 1 when training failed, 2 for a bad config."""
    return run_job_command(TRAIN_COMMAND, args, out, err)


__all__ = ["OVERRIDE_FLAGS", "configure_train_parser", "job_from_args", "mlflow_ui_command", "run_train_cli"]
