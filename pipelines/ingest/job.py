"""The ingest job (``IngestJob``) and its report (``IngestReport``)."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ossnet.config import PRESETS, ConfigError
from ossnet.geometry import RESAMPLE_MODES
from ossnet.targets import TARGET_PRESETS
from ossnet_pipelines.ingest.case import CaseReport
from ossnet_pipelines.ingest.sources import LAYOUTS, IngestError
from ossnet_pipelines.jobconfig import Job, NonBlank
from ossnet_pipelines.progress import CaseCounts
from ossnet_pipelines.volumes import SCHEDULERS

logger = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("auto", "serial", "process", "ray")
ZSCORE_CHOICES: tuple[str, ...] = ("auto", "nonzero", "all")
RESAMPLE_CHOICES: tuple[str, ...] = ("auto",) + RESAMPLE_MODES

_Size = Annotated[int, Field(ge=2)]
_Spacing = Annotated[float, Field(gt=0.0)]


class IngestJob(Job):
    """One ingest run; constructing it checks every field (``IngestError`` naming the first bad one).

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
        label_values: allowed source label values (default per layout; generic: 0, 1; with a
            multi-target map: its label values).
        targets: the target map of the store (``ossnet.targets.TARGET_PRESETS``): "binary" (the
            paper: labels stored as 0/1), or e.g. "brats-regions" / "lits-classes" (labels keep
            the source's values, each target gets its own border band, the map is recorded).
        val_fraction: fraction of cases in the validation split (when no split file).
        test_fraction: fraction of cases in the test split (when no split file): cases no training,
            checkpoint selection or sweep selection sees, whose Dice decides ``champion``.
        split_seed: seed of the deterministic split.
        split_file: JSON / CSV / reference-style text split file; overrides the seeded split.
        workers: cases processed in parallel.
        executor: "auto", "serial", "process" or "ray".
        overwrite: delete the store first and ingest everything again.
        require_labels: fail cases without a label (False: ingest them unlabelled).
        affine_atol: tolerance (mm) when comparing the affines of a case's files.
        storage_options: fsspec options for the store URL.
    """

    error_type: ClassVar[type[Exception]] = IngestError
    error_prefix: ClassVar[str] = "ingest."

    source: NonBlank
    store: NonBlank
    layout: Literal[LAYOUTS] = "auto"
    labels: Optional[NonBlank] = None
    preset: Literal[PRESETS] = "brats"
    volume_shape: Optional[tuple[_Size, _Size, _Size]] = None
    band_width: int = Field(6, ge=0)
    zscore_mask: Literal[ZSCORE_CHOICES] = "auto"
    resample: Literal[RESAMPLE_CHOICES] = "auto"
    target_spacing: Optional[tuple[_Spacing, _Spacing, _Spacing]] = None
    threads: int = Field(1, ge=1)
    scheduler: Literal[SCHEDULERS] = "threads"
    label_values: Optional[tuple[Annotated[int, Field(ge=0)], ...]] = None
    targets: Literal[tuple(TARGET_PRESETS)] = "binary"  # type: ignore[valid-type]
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    split_seed: int = 0
    split_file: Optional[NonBlank] = None
    workers: int = Field(1, ge=1)
    executor: Literal[EXECUTORS] = "auto"
    overwrite: bool = False
    require_labels: bool = True
    affine_atol: float = Field(1e-3, ge=0.0)
    storage_options: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _fractions_leave_training_cases(self) -> "IngestJob":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"test_fraction: val_fraction + test_fraction must be < 1, got "
                              f"{self.val_fraction:g} + {self.test_fraction:g}")
        return self

    @model_validator(mode="after")
    def _spacing_given(self) -> "IngestJob":
        if self.resample == "spacing" and self.target_spacing is None:
            raise ConfigError("target_spacing: required with resample 'spacing' (three spacings in mm)")
        return self


@dataclass(frozen=True)
class IngestReport(CaseCounts):
    """Outcome of an ingest run (``count``, ``failed`` and ``ok`` from ``CaseCounts``).

    Attributes:
        hidden: hidden files and folders of the source that were skipped (names starting with
            '.' or '__'), said in the summary.
    """

    store: str
    layout: str
    cases: tuple[CaseReport, ...]
    seconds: float
    executor: str = "serial"
    hidden: tuple[str, ...] = ()

    def table(self) -> str:
        """A fixed-width summary table: one row per case, then the totals."""
        width = max([len("case")] + [len(c.case_id) for c in self.cases])
        lines = [f"{'case':<{width}}  {'status':<8}  {'split':<10}  {'sec':>6}  message"]
        for c in sorted(self.cases, key=lambda r: (r.status != "failed", r.case_id)):
            row = f"{c.case_id:<{width}}  {c.status:<8}  {c.split or '-':<10}  {c.seconds:6.1f}  {c.message}"
            lines.append(row.rstrip())
        lines.append(f"{self.count('ingested')} ingested, {self.count('skipped')} skipped, "
                     f"{self.count('failed')} failed in {self.seconds:.1f} s -> {self.store}")
        if self.hidden:
            shown = ", ".join(posixpath.basename(p.rstrip("/")) for p in self.hidden[:5])
            more = f" and {len(self.hidden) - 5} more" if len(self.hidden) > 5 else ""
            lines.append(f"{len(self.hidden)} hidden files or folders skipped (names starting with '.' or '__'): "
                         f"{shown}{more}")
        return "\n".join(lines)


__all__ = ["EXECUTORS", "RESAMPLE_CHOICES", "ZSCORE_CHOICES", "IngestJob", "IngestReport"]
