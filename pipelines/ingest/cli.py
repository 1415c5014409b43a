"""``ossnet ingest``: the parser, the job it builds and the command that runs it."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

from ossnet.config import PRESETS
from ossnet.targets import TARGET_PRESETS
from ossnet_pipelines.ingest.case import one_line
from ossnet_pipelines.ingest.driver import ingest
from ossnet_pipelines.ingest.job import EXECUTORS, RESAMPLE_CHOICES, ZSCORE_CHOICES, IngestJob
from ossnet_pipelines.ingest.sources import LAYOUTS, IngestError
from ossnet_pipelines.store import StoreError
from ossnet_pipelines.volumes import SCHEDULERS

logger = logging.getLogger(__name__)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def configure_ingest_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ossnet ingest`` arguments to ``parser`` (the lead's CLI calls this)."""
    parser.description = ("Convert a NIfTI archive (BraTS 2020, LiTS or generic image/label pairs) into an "
                          "ossnet Zarr store: reoriented to RAS, z-scored, resampled (--resample) and "
                          "cropped/padded to the preset grid, with labels and border bands. Scans are read and "
                          "transformed in slabs, so a scan larger than memory ingests too. Re-running "
                          "completes an interrupted ingest. Exits 1 if any case failed.")
    parser.add_argument("source", help="archive folder or CSV (columns image|image_<modality>, label, [case_id])")
    parser.add_argument("--store", required=True, help="output store path or URL (file://, s3://, memory://...)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="archive layout (default: detect)")
    parser.add_argument("--labels", default=None, help="generic layout: labels folder (default: <source>/labels)")
    parser.add_argument("--preset", choices=PRESETS, default="brats", help="model grid preset (default: brats)")
    parser.add_argument("--volume-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="override the preset's full-resolution grid")
    parser.add_argument("--band-width", type=int, default=6, help="border band half-width in voxels (default: 6)")
    parser.add_argument("--zscore-mask", choices=ZSCORE_CHOICES, default="auto",
                        help="z-score over nonzero voxels or all voxels (auto: BraTS nonzero, others all)")
    parser.add_argument("--resample", choices=RESAMPLE_CHOICES, default="auto",
                        help="how scans reach the grid: none (reorient, crop/pad), resize (stretch onto the grid, as "
                             "the paper does for LiTS), spacing (resample to --target-spacing, then crop/pad); "
                             "auto: the preset's (lits: resize, others: none)")
    parser.add_argument("--target-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm (RAS axes) for --resample spacing, e.g. 1 1 1")
    parser.add_argument("--threads", type=int, default=1,
                        help="dask threads per case: slabs of one scan read and transformed in parallel (default: 1)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="threads",
                        help="threads: dask threads inside each case task; ray: one scan's slabs over the Ray cluster")
    parser.add_argument("--label-values", type=_int_list, default=None,
                        help="allowed source label values, e.g. 0,1,2 (default per layout; generic 0,1)")
    parser.add_argument("--targets", choices=tuple(TARGET_PRESETS), default="binary",
                        help="what the labels mean: binary (the paper: foreground = any non-zero value) or a "
                             "target map that keeps the label values, e.g. brats-regions (WT 1,2,4 / TC 1,4 / "
                             "ET 4), brats2023-regions (ET 3), lits-classes (liver 1,2 / tumour 2)")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="validation fraction: the cases that pick the best epoch and the sweep's best trial "
                             "(default: 0.15)")
    parser.add_argument("--test-fraction", type=float, default=0.15,
                        help="test fraction: cases nothing trains or selects on; their Dice decides which model "
                             "becomes champion (default: 0.15; 0: no test split, models are registered but never "
                             "promoted)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the deterministic split (default: 0)")
    parser.add_argument("--split-file", default=None,
                        help="split file (JSON, CSV case_id,split, or reference 'Training:/Validation:/Testing:' text); "
                             "overrides --val-fraction and --test-fraction")
    parser.add_argument("--workers", type=int, default=1, help="cases in parallel (default: 1)")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="auto: Ray if a cluster is up, else processes when --workers > 1")
    parser.add_argument("--overwrite", action="store_true", help="delete the store first and ingest everything")
    parser.add_argument("--allow-unlabeled", action="store_true", help="ingest cases without a label file")
    return parser


def job_from_args(args: argparse.Namespace) -> IngestJob:
    """Build and validate an ``IngestJob`` from parsed ``configure_ingest_parser`` arguments."""
    return IngestJob(
        source=args.source, store=args.store, layout=args.layout, labels=args.labels, preset=args.preset,
        volume_shape=tuple(args.volume_shape) if args.volume_shape else None, band_width=args.band_width,
        zscore_mask=args.zscore_mask, resample=args.resample,
        target_spacing=tuple(args.target_spacing) if args.target_spacing else None, threads=args.threads,
        scheduler=args.scheduler, label_values=args.label_values, targets=args.targets,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, split_file=args.split_file, workers=args.workers, executor=args.executor,
        overwrite=args.overwrite, require_labels=not args.allow_unlabeled,
    )


def run_ingest_cli(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``ossnet ingest``: print the summary table; 0 if every case ingested or was skipped,
    1 if any case failed, 2 if the ingest could not run at all."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        report = ingest(job_from_args(args))
    except (IngestError, StoreError) as exc:
        err.write(f"error: {one_line(exc)}\n")
        return 2
    out.write(report.table() + "\n")
    return 0 if report.ok else 1


__all__ = ["configure_ingest_parser", "job_from_args", "run_ingest_cli"]
