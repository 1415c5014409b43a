"""The inference job description (``InferJob``), its per-case result rows and the final report.

Pure Python: no torch, Ray or MLflow here, so the CLI parser and the unit tests import it fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Iterable, Literal, Mapping, Optional

from pydantic import Field, model_validator

from ossnet.config import ConfigError
from ossnet.inference_options import MAX_RECALL_MARGIN
from ossnet.inference_options import MODES as INFERENCE_MODES
from ossnet_pipelines.constants import SPLITS
from ossnet_pipelines.files import absolute_url
from ossnet_pipelines.jobconfig import Job, NonBlank
from ossnet_pipelines.progress import CaseCounts
from ossnet_pipelines.tracking.registry import DEFAULT_MODEL_SPEC

INPUT_LAYOUTS: tuple[str, ...] = ("auto", "nifti", "brats", "lits", "generic", "zarr")
MODES: tuple[str, ...] = ("auto", *INFERENCE_MODES)  # "auto": mise_lowres if the model has a low-res head
STATUSES: tuple[str, ...] = ("ok", "failed", "skipped")
REPORT_COLUMNS: tuple[str, ...] = (
    "case_id", "status", "error", "seconds", "predict_seconds", "n_queries", "foreground_ml", "dice", "iou", "mode",
    "model", "model_sha256", "mask", "targets",
)


class InferError(ValueError):
    """The job cannot run at all (bad field, unreadable input, input/model mismatch); one line."""


class InferJob(Job):
    """One batch inference run; constructing it checks every field (``InferError`` naming the first bad one).

    Attributes:
        input: a folder or glob of NIfTI files, a single NIfTI file, a BraTS-style folder of case
            folders, a generic ``images/`` (+ ``labels/``) folder, a CSV (``image`` or
            ``image_<modality>`` columns, optional ``label`` and ``case_id``), or an ossnet Zarr
            store; local path or fsspec URL.
        output: output folder (local path or fsspec URL): ``masks/``, ``probabilities/``,
            ``predictions.zarr``, ``report.parquet``, ``report.csv``.
        model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow run id or a checkpoint path.
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or the local database).
        layout: "auto" or one of ``INPUT_LAYOUTS`` ("nifti": one single-channel file per case).
        labels: folder of reference labels matched to cases by file stem (nifti and generic
            layouts); BraTS/LiTS/CSV/Zarr inputs bring their own labels. Enables Dice/IoU.
        split: Zarr input only: one split ("train", "val", "test", "unassigned"); None: all cases.
        mode: "auto" (low-res-start MISE for models with a low-res head, else dense-start MISE),
            "dense", "mise" or "mise_lowres".
        chunk_points: points per decoder pass; bounds the inference memory.
        recall_margin: MISE refines cells within this many logits of the threshold, not only
            those straddling it (None: the library default, 8); more finds smaller, sharper
            components at the cost of queries. See the README's "What MISE finds".
        actors: size of the predictor actor pool.
        gpus_per_actor: GPUs per predictor actor; None: 1 when the cluster has GPUs (shared
            fractionally when there are more actors than GPUs), else 0.
        cpus_per_actor: CPUs per predictor actor (also its torch thread count on CPU).
        save_probabilities: also write float32 probability maps (NIfTI); decodes every voxel
            (mode "auto" runs "dense"): off the surface MISE's map is an interpolation, not a
            probability.
        save_zarr: also write masks (and probabilities) into ``predictions.zarr``.
        save_target_masks: multi-target models: also write each target's region as its own
            mask (``targets/<target>/<case>.nii.gz``), besides the label map in ``masks/``.
        overwrite: redo every case, even those a previous run finished.
        storage_options: fsspec options for input and output URLs.
        affine_atol: tolerance (mm) when comparing the affines of a case's files.
        report_every_s: the report is rewritten at least this often while the job runs, so a
            killed job keeps the record of the cases it finished.
        progress_every: log a progress line every N finished cases (0: about 10 lines per job).
    """

    error_type: ClassVar[type[Exception]] = InferError
    error_prefix: ClassVar[str] = "infer."

    input: NonBlank
    output: NonBlank
    model: NonBlank = DEFAULT_MODEL_SPEC
    tracking_uri: Optional[str] = None
    layout: Literal[INPUT_LAYOUTS] = "auto"
    labels: Optional[NonBlank] = None
    split: Optional[Literal[SPLITS]] = None
    mode: Literal[MODES] = "auto"
    chunk_points: int = Field(2**14, ge=1)
    recall_margin: Optional[float] = Field(None, ge=0.0, le=MAX_RECALL_MARGIN)
    actors: int = Field(1, ge=1)
    gpus_per_actor: Optional[float] = Field(None, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    save_probabilities: bool = False
    save_zarr: bool = False
    save_target_masks: bool = False
    overwrite: bool = False
    storage_options: Optional[dict[str, Any]] = None
    affine_atol: float = Field(1e-3, ge=0.0)
    report_every_s: float = Field(30.0, gt=0.0)
    progress_every: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _combinations(self) -> "InferJob":
        if self.save_probabilities and self.mode not in ("auto", "dense"):
            raise ConfigError(f"save_probabilities: needs mode 'dense' or 'auto', not {self.mode!r} (MISE decodes "
                              "only near the surface; elsewhere its map is an interpolation, not a probability)")
        if self.split is not None and self.layout not in ("auto", "zarr"):
            raise ConfigError(f"split: only for Zarr store inputs, not layout {self.layout!r}")
        return self

    @property
    def predictor_mode(self) -> str:
        """The mode the predictors get: "dense" when probability maps are saved under "auto"."""
        return "dense" if self.save_probabilities and self.mode == "auto" else self.mode

    def normalized(self) -> "InferJob":
        """A copy with local paths made absolute (what the workers receive)."""
        return self.updated({"input": absolute_url(self.input), "output": absolute_url(self.output).rstrip("/") or "/",
                             "labels": absolute_url(self.labels) if self.labels else None})


@dataclass(frozen=True)
class CaseResult:
    """One row of the report (multi-target models add per-target columns, see ``targets``).

    Attributes:
        case_id: the case.
        status: "ok", "failed" or "skipped" (finished by an earlier run with the same model).
        error: one line saying why the case failed (or what was wrong with its reference label).
        seconds: read + predict + write time of this case (queueing excluded).
        predict_seconds: the model's share of it (encode + decode on the actor's device).
        n_queries: points the model decoded.
        foreground_ml: predicted foreground volume in millilitres.
        dice, iou: against the reference label in the scan's geometry; NaN without one.
        mode: the inference mode that ran.
        model: the model as resolved (``models:/NAME/VERSION``, ``models:/<id>`` or a file).
        model_sha256: SHA-256 of the checkpoint (first 16 hex digits): a re-run with another
            model redoes the case.
        mask: URL of the written mask (multi-target models: the label map in the source's
            convention).
        targets: multi-target models: JSON of ``ossnet.metrics.target_scores`` against the
            reference (``dice_<target>``, ``iou_<target>``, ``hd95_<target>``, ``tp_/fp_/fn_<target>``;
            the report expands it into columns); "" otherwise.
    """

    case_id: str
    status: str
    error: str = ""
    seconds: float = 0.0
    predict_seconds: float = 0.0
    n_queries: int = 0
    foreground_ml: float = math.nan
    dice: float = math.nan
    iou: float = math.nan
    mode: str = ""
    model: str = ""
    model_sha256: str = ""
    mask: str = ""
    targets: str = ""

    def to_row(self) -> dict[str, Any]:
        """Plain dict in ``REPORT_COLUMNS`` order."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "CaseResult":
        """Inverse of ``to_row``; tolerates missing columns and nulls (older or partial reports)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in row:
                continue
            value = row[f.name]
            if f.type in ("float", float):
                kwargs[f.name] = math.nan if value is None else float(value)
            elif f.type in ("int", int):
                kwargs[f.name] = 0 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
            else:
                kwargs[f.name] = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        return cls(**kwargs)


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


@dataclass(frozen=True)
class InferReport(CaseCounts):
    """Outcome of a run: one ``CaseResult`` per listed case.

    Attributes:
        output: the output folder.
        cases: results sorted by case id.
        seconds: wall time of the run (model resolution included).
        pipeline_seconds: wall time of the Ray pipeline (0 when every case was skipped).
        report_path: URL of the Parquet report (the CSV sits beside it).
        actors: predictor actors used.
        gpus_per_actor: GPUs per actor used.
    """

    output: str
    cases: tuple[CaseResult, ...]
    seconds: float
    pipeline_seconds: float = 0.0
    report_path: str = ""
    actors: int = 0
    gpus_per_actor: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def processed(self) -> int:
        """Cases this run worked on (ok or failed; not skipped)."""
        return self.count("ok") + self.count("failed")

    @property
    def cases_per_s(self) -> float:
        """Throughput of the pipeline over the cases it processed (NaN when none)."""
        if self.processed == 0 or self.pipeline_seconds <= 0:
            return math.nan
        return self.processed / self.pipeline_seconds

    @property
    def mean_dice(self) -> float:
        """Mean Dice over finished cases (ok or skipped) that have a reference; NaN if none."""
        values = _finite(c.dice for c in self.cases if c.status != "failed")
        return sum(values) / len(values) if values else math.nan

    @property
    def mean_iou(self) -> float:
        values = _finite(c.iou for c in self.cases if c.status != "failed")
        return sum(values) / len(values) if values else math.nan

    def target_summary(self) -> list[str]:
        """Multi-target models: per target, the mean Dice over cases (and HD95) and the global
        Dice pooled over all voxels of all cases, with the conventions used; [] otherwise."""
        scored = [json.loads(c.targets) for c in self.cases if c.status != "failed" and c.targets]
        if not scored:
            return []
        from ossnet.metrics import pooled_dice  # torch: only for a multi-target report

        lines = []
        for name in (key.removeprefix("dice_") for key in scored[0] if key.startswith("dice_")):
            per_case = [s for s in scored if f"dice_{name}" in s]
            hd = _finite(s.get(f"hd95_{name}", math.nan) for s in per_case)
            hd_text = f", HD95 {sum(hd) / len(hd):.2f} mm" if hd else ""
            mean = sum(s[f"dice_{name}"] for s in per_case) / len(per_case)
            lines.append(f"infer: {name}: mean Dice {mean:.4f} over {len(per_case)} cases, "
                         f"global Dice {pooled_dice(per_case, name):.4f}{hd_text}")
        lines.append("infer: conventions: Dice/IoU per case on the written label map (both empty 1, one empty 0); "
                     "HD95 in mm, both empty 0, one empty 373.13 (BraTS 2020); global Dice pools every case's "
                     "voxels (LiTS)")
        return lines

    def summary(self) -> str:
        """Counts, mean Dice, throughput and where the outputs are, in a few lines."""
        n_ref = len(_finite(c.dice for c in self.cases if c.status != "failed"))
        dice_text = f"mean Dice {self.mean_dice:.4f} / IoU {self.mean_iou:.4f} over {n_ref} cases with a reference" \
            if n_ref else "no reference labels (no Dice)"
        rate = self.cases_per_s
        rate_text = (f"{rate:.3f} cases/s over {self.processed} processed" if math.isfinite(rate)
                     else "nothing processed")
        return "\n".join([
            f"infer: {len(self.cases)} cases: {self.count('ok')} ok, {self.count('failed')} failed, "
            f"{self.count('skipped')} skipped in {self.seconds:.1f} s ({rate_text}, {self.actors} actor(s))",
            f"infer: {dice_text}",
            *self.target_summary(),
            f"infer: outputs in {self.output} (masks/), report {self.report_path}",
        ])

    def table(self, limit: int = 20) -> str:
        """Failed cases first (up to ``limit`` rows), then the summary."""
        width = max([len("case")] + [len(c.case_id) for c in self.failed[:limit]])
        lines = []
        if self.failed:
            lines.append(f"{'case':<{width}}  error")
            lines += [f"{c.case_id:<{width}}  {c.error}" for c in self.failed[:limit]]
            if len(self.failed) > limit:
                lines.append(f"... and {len(self.failed) - limit} more failed cases (see the report)")
        lines.append(self.summary())
        return "\n".join(lines)


__all__ = [
    "CaseResult",
    "INPUT_LAYOUTS",
    "InferError",
    "InferJob",
    "InferReport",
    "MODES",
    "REPORT_COLUMNS",
    "STATUSES",
]
