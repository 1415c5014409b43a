"""Validation inside the training loop: dense full-resolution metrics through MISE, plus the
auxiliary point and low-resolution metrics, and PNG slice overlays.

Multi-target models are scored on the label map they write, per target (``dice_<t>``,
``iou_<t>``, ``hd95_<t>`` in mm with the BraTS 2020 conventions, ``ossnet.metrics.target_scores``),
with ``dice`` the mean over targets or one target's (``validation.objective``), and the pooled
"global" Dice per target over all validation cases (``val_global_dice_<t>``, LiTS' second score).

Each rank validates its share of the validation cases (``cases[rank::world_size]``) on the bare
model in eval mode (no DDP hooks, so no collective runs inside); the loop then gathers the
per-case scores and averages them. The auxiliary metrics use one un-augmented sample per case
drawn at a fixed epoch (0), so they are comparable from one validation to the next.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ossnet.inference import Inferer
from ossnet.metrics import collapse_warning, dice, iou, pooled_dice, target_scores
from ossnet.training import batch_to_device, evaluate_batch
from ossnet_pipelines.data import SampleSpec, cached_store, collate_rows, sample_case_rows
from ossnet_pipelines.tracking.tags import COLLAPSE_TAG

logger = logging.getLogger(__name__)

# Scalar keys of one case's scores (the loop averages each over all cases).
CASE_KEYS = ("dice", "iou", "queries", "seconds", "loss", "point_loss", "aux_loss", "point_acc", "lowres_dice")
# Per-target keys of multi-target models (``dice_wt``...), averaged too; the counts are pooled.
_TARGET_KEYS = ("dice_", "iou_", "hd95_", "points_")


@dataclass
class Validator:
    """Scores one rank's validation cases.

    Attributes:
        store_url: the store (opened once per process).
        case_ids: the validation cases this rank scores.
        spec: sampling spec of the auxiliary point metrics (augmentation off).
        inferer: the MISE (or dense) inference strategy on the rank's device.
        alpha: auxiliary loss weight (for the validation loss).
        png_cases: how many of ``case_ids`` (from the first) get a slice overlay.
        png_dir: where overlays are written.
    """

    store_url: str
    case_ids: Sequence[str]
    spec: SampleSpec
    inferer: Inferer
    alpha: float
    png_cases: int = 0
    png_dir: Path | None = None
    objective: str = "mean"
    weights: Sequence[float] | None = None
    _device: torch.device = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._device = torch.device(self.inferer.device)

    def __call__(self, model: nn.Module, epoch: int) -> tuple[list[dict[str, float]], list[Path]]:
        """Score every case of this rank.

        Args:
            model: the bare ``OSSNet`` on the inferer's device.
            epoch: the training epoch (names the PNGs).

        Returns:
            Per-case score dicts (``CASE_KEYS`` plus ``case_id``), and the PNGs written.
        """
        store = cached_store(self.store_url)
        scores: list[dict[str, Any]] = []
        pngs: list[Path] = []
        for index, case_id in enumerate(self.case_ids):
            arrays = store.read_case(case_id, arrays=self.spec.arrays)
            score, mask = segment_case(model, self.inferer, arrays, case_id, self.objective,
                                       spacing=store.case_attrs(case_id).get("spacing", (1.0, 1.0, 1.0)))
            rows = sample_case_rows(arrays, case_id, 0, self.spec)
            batch = batch_to_device(collate_rows(rows), self._device)
            score.update(evaluate_batch(model, batch, self.alpha, self.weights))
            scores.append(score)
            if index < self.png_cases and self.png_dir is not None:
                from ossnet_pipelines.figures import slice_overlay_png

                path = self.png_dir / f"epoch_{epoch:04d}" / f"{case_id}.png"
                title = f"{case_id}  epoch {epoch}  Dice {score['dice']:.3f}"
                pngs.append(slice_overlay_png(np.asarray(arrays["image"], dtype=np.float32),
                                              np.asarray(arrays["label"]) > 0, mask, path, title=title))
            del arrays, mask
        return scores, pngs


def segment_case(
    model: nn.Module,
    inferer: Inferer,
    arrays: Mapping[str, Any],
    case_id: str,
    objective: str = "mean",
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[dict[str, Any], np.ndarray]:
    """Segment one stored case at full resolution and score it against its label.

    Args:
        model: the bare ``OSSNet`` on the inferer's device.
        inferer: MISE or dense decoding.
        arrays: the case's ``image`` (C, D, H, W) and ``label`` (D, H, W) arrays.
        case_id: names the scores.
        objective: multi-target models: ``dice``/``iou`` is the mean over targets or one target's.
        spacing: voxel spacing in mm (HD95 of multi-target models).

    Returns:
        ``(scores, mask)``: ``dice``, ``iou`` (plus ``dice_<t>``... for multi-target models),
        ``queries``, ``seconds``, ``pred_voxels``, ``ref_voxels``, ``case_id``; and the predicted
        foreground (D, H, W) bool.
    """
    targets = model.config.targets
    image = np.asarray(arrays["image"], dtype=np.float32)
    values = np.asarray(arrays["label"])
    label = values > 0
    start = time.perf_counter()
    result = inferer(model, image)
    seconds = time.perf_counter() - start
    if targets.kind == "binary":
        mask = np.asarray(result.mask)
        score: dict[str, Any] = {"dice": dice(mask, label), "iou": iou(mask, label)}
    else:
        written = np.asarray(result.label_map)
        mask = written > 0
        score = target_scores(written, values, targets, tuple(spacing))
        names = targets.names if objective == "mean" else (objective,)
        score["dice"] = float(np.mean([score[f"dice_{n}"] for n in names]))
        score["iou"] = float(np.mean([score[f"iou_{n}"] for n in names]))
    score.update({"case_id": case_id, "queries": float(result.n_queries), "seconds": seconds,
                  "pred_voxels": int(np.count_nonzero(mask)), "ref_voxels": int(np.count_nonzero(label))})
    return score, mask


def summarize(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each score over cases, as ``val_<key>`` metrics (``val_dice``, ``val_iou``...),
    plus ``val_pred_ratio``: predicted over reference foreground volume, all cases together."""
    if not scores:
        raise ValueError("validation: no case was scored")
    out: dict[str, float] = {}
    per_target = sorted({k for s in scores for k in s if k.startswith(_TARGET_KEYS)})
    for key in (*CASE_KEYS, *per_target):
        values = [float(s[key]) for s in scores if key in s]
        if values:
            out[f"val_{key}"] = float(np.mean(values))
    for key in per_target:
        if key.startswith("dice_"):
            out[f"val_global_{key}"] = pooled_dice(scores, key.removeprefix("dice_"))
    out["val_cases"] = float(len(scores))
    ref = sum(int(s["ref_voxels"]) for s in scores)
    if ref:
        out["val_pred_ratio"] = sum(int(s["pred_voxels"]) for s in scores) / ref
    return out


def collapse_message(scores: Sequence[Mapping[str, Any]]) -> str | None:
    """``ossnet.metrics.collapse_warning`` over the scored cases (None: no collapse)."""
    return collapse_warning([int(s["pred_voxels"]) for s in scores], [int(s["ref_voxels"]) for s in scores])


__all__ = ["CASE_KEYS", "COLLAPSE_TAG", "Validator", "collapse_message", "segment_case", "summarize"]
