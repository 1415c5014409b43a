"""The ingest job (``IngestJob``) and its report (``IngestReport``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ossnet.config import PRESETS
from ossnet.geometry import RESAMPLE_MODES
from pipelines.ingest.case import CaseReport
from pipelines.ingest.sources import LAYOUTS, IngestError
from pipelines.volumes import SCHEDULERS

logger = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("auto", "serial", "process", "ray")
ZSCORE_CHOICES: tuple[str, ...] = ("auto", "nonzero", "all")
RESAMPLE_CHOICES: tuple[str, ...] = ("auto",) + RESAMPLE_MODES


@dataclass(frozen=True)
class IngestJob:
    """One ingest run.

    Attributes:
        source: archive folder or CSV (local path, ``file://`` or fsspec URL).
        store: store path or URL (``file://``, ``memory://``, ``s3://``...).
        layout: "auto", "brats", "lits" or "generic".
        labels: generic layout: labels folder (default ``<source>/labels``).
        preset: model preset whose grid the store holds (``ossnet.config.PRESETS``).
        volume_shape: override the preset's full-resolution grid ``(X, Y, Z)``.
        band_width: border band half-width in voxels (6 = the paper's 13^3 band).
        zscore_mask: "auto" (BraTS: nonzero, others: all), "nonzero" or "all".
        resample: "auto" (the preset's: ``resize`` for lits, else ``none``), "none" (keep the voxel
            grid, crop/pad), "resize" (stretch onto the grid) or "spacing" (resample to
            ``target_spacing``, then crop/pad); see ``ossnet.geometry``.
        target_spacing: voxel spacing in mm along the RAS axes, for ``resample="spacing"``.
        threads: dask threads per case (chunks of one scan read and transformed in parallel).
        scheduler: "threads" (dask's threaded scheduler in each case task) or "ray" (one scan's
            chunks spread over the Ray cluster; the source must be on storage every node sees).
        label_values: allowed source label values (default per layout; generic: 0, 1).
        val_fraction: fraction of cases in the validation split (when no split file).
        split_seed: seed of the deterministic split.
        split_file: JSON / CSV / reference-style text split file; overrides the seeded split.
        workers: cases processed in parallel.
        executor: "auto", "serial", "process" or "ray".
        overwrite: delete the store first and ingest everything again.
        require_labels: fail cases without a label (False: ingest them unlabelled).
        affine_atol: tolerance (mm) when comparing the affines of a case's files.
        storage_options: fsspec options for the store URL.
    """

    source: str
    store: str
    layout: str = "auto"
    labels: str | None = None
    preset: str = "brats"
    volume_shape: tuple[int, int, int] | None = None
    band_width: int = 6
    zscore_mask: str = "auto"
    resample: str = "auto"
    target_spacing: tuple[float, float, float] | None = None
    threads: int = 1
    scheduler: str = "threads"
    label_values: tuple[int, ...] | None = None
    val_fraction: float = 0.15
    split_seed: int = 0
    split_file: str | None = None
    workers: int = 1
    executor: str = "auto"
    overwrite: bool = False
    require_labels: bool = True
    affine_atol: float = 1e-3
    storage_options: Mapping[str, Any] | None = None

    def validate(self) -> "IngestJob":
        """Check every field; raise ``IngestError`` naming the first bad one. Returns self."""
        checks = [
            (bool(str(self.source)), "source", "must not be empty"),
            (bool(str(self.store)), "store", "must not be empty"),
            (self.layout in LAYOUTS, "layout", f"must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.band_width >= 0, "band_width", f"must be >= 0, got {self.band_width}"),
            (self.zscore_mask in ZSCORE_CHOICES, "zscore_mask", f"must be one of {', '.join(ZSCORE_CHOICES)}"),
            (self.resample in RESAMPLE_CHOICES, "resample",
             f"must be one of {', '.join(RESAMPLE_CHOICES)}, got {self.resample!r}"),
            (self.resample != "spacing" or self.target_spacing is not None, "target_spacing",
             "required with resample 'spacing' (three spacings in mm)"),
            (self.target_spacing is None or (len(self.target_spacing) == 3 and all(
                math.isfinite(float(v)) and float(v) > 0 for v in self.target_spacing)), "target_spacing",
             f"needs three positive spacings in mm, got {self.target_spacing}"),
            (self.threads >= 1, "threads", f"must be >= 1, got {self.threads}"),
            (self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}"),
            (self.workers >= 1, "workers", f"must be >= 1, got {self.workers}"),
            (self.executor in EXECUTORS, "executor", f"must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"),
            (self.affine_atol >= 0, "affine_atol", f"must be >= 0, got {self.affine_atol}"),
            (self.volume_shape is None or len(self.volume_shape) == 3, "volume_shape", "needs three sizes"),
            (self.label_values is None or all(int(v) >= 0 for v in self.label_values), "label_values",
             "must be non-negative integers"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise IngestError(f"ingest.{name}: {message}")
        return self


@dataclass(frozen=True)
class IngestReport:
    """Outcome of an ingest run."""

    store: str
    layout: str
    cases: tuple[CaseReport, ...]
    seconds: float
    executor: str = "serial"

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cases)

    @property
    def failed(self) -> tuple[CaseReport, ...]:
        return tuple(c for c in self.cases if c.status == "failed")

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def table(self) -> str:
        """A fixed-width summary table: one row per case, then the totals."""
        width = max([len("case")] + [len(c.case_id) for c in self.cases])
        lines = [f"{'case':<{width}}  {'status':<8}  {'split':<10}  {'sec':>6}  message"]
        for c in sorted(self.cases, key=lambda r: (r.status != "failed", r.case_id)):
            row = f"{c.case_id:<{width}}  {c.status:<8}  {c.split or '-':<10}  {c.seconds:6.1f}  {c.message}"
            lines.append(row.rstrip())
        lines.append(f"{self.count('ingested')} ingested, {self.count('skipped')} skipped, "
                     f"{self.count('failed')} failed in {self.seconds:.1f} s -> {self.store}")
        return "\n".join(lines)


__all__ = ["EXECUTORS", "RESAMPLE_CHOICES", "ZSCORE_CHOICES", "IngestJob", "IngestReport"]
