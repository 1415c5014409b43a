"""``ossnet infer``: segment a folder of scans (or a store) with a trained model.

Examples::

    ossnet infer /data/export/ --output /data/masks                      # models:/ossnet@champion
    ossnet infer /data/BraTS2020_Validation --output preds/ --model models:/ossnet-brats2020/7
    ossnet infer scans/ --output preds/ --model checkpoint.pt --actors 2 --save-probabilities
    ossnet infer /data/brats.zarr --split test --output preds/          # a store's test cases
    ossnet infer scans/ --output preds/ --address http://127.0.0.1:8275  # a Ray job

Each scan is prepared exactly as the model's training data was, segmented at full resolution
(MISE started from the low-resolution segmentation) and written back in the scan's own grid as
``<output>/masks/<case>.nii.gz``, with a report (``report.parquet``, ``report.csv``) of status,
timing and, where a reference label is given, Dice and IoU. A case that cannot be read fails
with one line and the others go on; running the same command again skips finished cases.
Settings come from ``--config YAML`` (a flat mapping of the fields below), then ``--set
KEY=VALUE``, then the flags.

Exit codes: 0 every case ok or skipped, 1 some case failed, 2 the job could not run (unknown
model or alias, unreadable input, bad setting).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TextIO

from ossnet.inference_options import DEFAULT_RECALL_MARGIN
from ossnet_pipelines.infer.job import INPUT_LAYOUTS, MODES, InferError, InferJob
from ossnet_pipelines.jobrunner import (
    JobCommand,
    OverrideFlag,
    add_config_arguments,
    add_submission_arguments,
    config_from_args,
    run_job_command,
)

logger = logging.getLogger(__name__)

FLAGS: tuple[OverrideFlag, ...] = (
    OverrideFlag("--output", "output", str, "output folder or URL (masks/, report.parquet, report.csv)"),
    OverrideFlag("--model", "model", str, "models:/NAME@ALIAS (default models:/ossnet@champion), "
                 "models:/NAME/VERSION, an MLflow run id or a checkpoint file"),
    OverrideFlag("--tracking-uri", "tracking_uri", str, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                 "or the local database)"),
    OverrideFlag("--layout", "layout", str, f"input layout: {', '.join(INPUT_LAYOUTS)} (default: auto)"),
    OverrideFlag("--labels", "labels", str, "reference labels folder matched by file stem (enables Dice/IoU)"),
    OverrideFlag("--split", "split", str, "Zarr store input: only this split (train, val, test, unassigned)"),
    OverrideFlag("--mode", "mode", str, f"inference mode: {', '.join(MODES)} (default: auto = low-res-start "
                 "MISE when the model has a low-res head, else dense-start MISE)"),
    OverrideFlag("--chunk-points", "chunk_points", int, "points per decoder pass; bounds memory (default: 16384)"),
    OverrideFlag("--recall-margin", "recall_margin", float, "MISE also refines cells within this many logits of "
                 "the threshold: more finds smaller, sharper structures, at more queries "
                 f"(default: {DEFAULT_RECALL_MARGIN:g})"),
    OverrideFlag("--actors", "actors", int, "predictor actors (default: 1)"),
    OverrideFlag("--gpus-per-actor", "gpus_per_actor", float, "GPUs per actor (default: 1 if the cluster has GPUs)"),
    OverrideFlag("--cpus-per-actor", "cpus_per_actor", float, "CPUs per actor (default: 1)"),
    OverrideFlag("--save-probabilities", "save_probabilities", bool, "also write float32 probability maps"),
    OverrideFlag("--save-zarr", "save_zarr", bool, "also write a Zarr copy (predictions.zarr)"),
    OverrideFlag("--target-masks", "save_target_masks", bool,
                 "multi-target models: also write each target as its own mask (targets/<target>/<case>.nii.gz)"),
    OverrideFlag("--overwrite", "overwrite", bool, "redo every case, even finished ones"),
    OverrideFlag("--report-every", "report_every_s", float, "rewrite the report at least every S seconds (default 30)"),
)


def configure_infer_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ossnet infer`` arguments to ``parser``."""
    parser.add_argument("input", nargs="?", default=None,
                        help="NIfTI folder, glob or file; BraTS-style case folders; generic images/ folder; "
                             "CSV (image or image_<modality> columns, optional label, case_id); or a Zarr store")
    add_config_arguments(parser, FLAGS, set_example="recall_margin=4")
    add_submission_arguments(parser, "inference job", dry_run=False)
    return parser


def job_from_args(args: argparse.Namespace) -> InferJob:
    """Build and validate the ``InferJob`` of parsed ``configure_infer_parser`` arguments."""
    leading = [("input", args.input)] if args.input is not None else []
    return InferJob.parse(config_from_args(args, FLAGS, leading=leading))


def _submit_argv(args: argparse.Namespace, job: InferJob, out: TextIO) -> list[str]:
    """The job as the cluster runs it: every local path made absolute here, on the submitting
    machine (the job runs in an uploaded copy of the project, where relative paths mean nothing)."""
    resolved = job.normalized()
    model = resolved.model
    if "://" not in model and not model.startswith(("models:", "runs:")) and Path(model).expanduser().exists():
        resolved = resolved.updated({"model": str(Path(model).expanduser().resolve())})
    out.write(f"submitting inference of {resolved.input} to {args.address}\n")
    return ["infer", "--config-json", json.dumps(resolved.to_dict())]


def _run(args: argparse.Namespace, job: InferJob, out: TextIO) -> int:
    from ossnet_pipelines.infer.run import run_inference

    report = run_inference(job)
    out.write(report.table() + "\n")
    out.flush()
    return 0 if report.ok else 1


def _bad_input() -> tuple[type[BaseException], ...]:
    from ossnet_pipelines.tracking.registry import ModelNotFoundError

    return (InferError, ModelNotFoundError, ValueError)  # bad fields, unknown models, bad model URIs


def run_infer_cli(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``ossnet infer``: print failed cases and the summary; returns the exit code (0 all cases
    segmented, 1 some failed or the run did, 2 bad input)."""
    command = JobCommand(what="inference", build=job_from_args, run=_run, submit_argv=_submit_argv,
                         bad_input=_bad_input())
    return run_job_command(command, args, out, err)


__all__ = ["FLAGS", "configure_infer_parser", "job_from_args", "run_infer_cli"]
