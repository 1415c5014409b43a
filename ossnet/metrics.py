"""Segmentation metrics on dense, full-resolution binary masks.

Every function accepts NumPy arrays or torch tensors (any device) of the same shape; non-bool
inputs are binarised with ``!= 0``. Counts are computed where the data lives (no device copy).

Empty-mask conventions (the paper's reference code reports metrics on sampled points; this
project reports them on the dense volume, so empty cases must be defined):

- both masks empty: Dice = IoU = 1.0 (a correct "no tumour" prediction is perfect);
- exactly one mask empty: Dice = IoU = 0.0.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch

Mask = Union[np.ndarray, torch.Tensor]


class ConfusionCounts(NamedTuple):
    """Voxel counts of a binary prediction against a reference."""

    tp: int
    fp: int
    fn: int
    tn: int


def _pair(pred: Mask, ref: Mask) -> tuple[Mask, Mask]:
    """Binarise both masks and check that they describe the same grid."""
    if tuple(pred.shape) != tuple(ref.shape):
        raise ValueError(f"mask shapes differ: pred {tuple(pred.shape)} vs ref {tuple(ref.shape)}")
    if isinstance(pred, torch.Tensor) or isinstance(ref, torch.Tensor):
        p = pred if isinstance(pred, torch.Tensor) else torch.from_numpy(np.asarray(pred))
        r = ref if isinstance(ref, torch.Tensor) else torch.from_numpy(np.asarray(ref))
        r = r.to(p.device)
        return (p if p.dtype == torch.bool else p != 0), (r if r.dtype == torch.bool else r != 0)
    pa, ra = np.asarray(pred), np.asarray(ref)
    return (pa if pa.dtype == np.bool_ else pa != 0), (ra if ra.dtype == np.bool_ else ra != 0)


def _count(mask: Mask) -> int:
    return int(mask.sum().item()) if isinstance(mask, torch.Tensor) else int(np.count_nonzero(mask))


def confusion_counts(pred: Mask, ref: Mask) -> ConfusionCounts:
    """True/false positive/negative voxel counts.

    Args:
        pred: predicted mask, any shape.
        ref: reference mask, same shape as ``pred``.
    """
    p, r = _pair(pred, ref)
    tp = _count(p & r)
    n_pred, n_ref = _count(p), _count(r)
    total = int(np.prod(tuple(p.shape), dtype=np.int64))
    fp, fn = n_pred - tp, n_ref - tp
    return ConfusionCounts(tp=tp, fp=fp, fn=fn, tn=total - tp - fp - fn)


def dice_of(c: ConfusionCounts) -> float:
    """Dice from confusion counts (both masks empty -> 1.0); for counts computed elsewhere,
    e.g. chunk by chunk over a scan that does not fit in memory."""
    denom = 2 * c.tp + c.fp + c.fn
    return 1.0 if denom == 0 else 2.0 * c.tp / denom


def iou_of(c: ConfusionCounts) -> float:
    """IoU from confusion counts (both masks empty -> 1.0)."""
    union = c.tp + c.fp + c.fn
    return 1.0 if union == 0 else c.tp / union


def dice(pred: Mask, ref: Mask) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|).

    Both masks empty -> 1.0; exactly one empty -> 0.0.

    Args:
        pred: predicted mask, any shape (e.g. ``(X, Y, Z)``).
        ref: reference mask, same shape as ``pred``.
    """
    return dice_of(confusion_counts(pred, ref))


def iou(pred: Mask, ref: Mask) -> float:
    """Intersection over union |P∩R| / |P∪R| (Jaccard index).

    Both masks empty -> 1.0; exactly one empty -> 0.0.

    Args:
        pred: predicted mask, any shape.
        ref: reference mask, same shape as ``pred``.
    """
    return iou_of(confusion_counts(pred, ref))


def volume_ml(mask: Mask, spacing: Sequence[float]) -> float:
    """Foreground volume in millilitres.

    Args:
        mask: ``(X, Y, Z)`` binary mask.
        spacing: voxel size in millimetres along X, Y, Z (1 ml = 1000 mm^3).
    """
    if len(tuple(mask.shape)) != 3 or len(spacing) != 3:
        raise ValueError(f"volume_ml needs a 3D mask and 3 spacings, got shape {tuple(mask.shape)}, spacing {tuple(spacing)}")
    if any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    m = mask if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return _count(m != 0) * float(np.prod([float(s) for s in spacing])) / 1000.0


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face-neighbour (6-connectivity), as medpy defines it."""
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def hd95(pred: Mask, ref: Mask, spacing: Sequence[float] = (1.0, 1.0, 1.0), empty_value: float = float("nan")) -> float:
    """95th percentile of the symmetric surface distance, in the units of ``spacing`` (mm).

    The surface distances from the prediction's surface voxels to the reference surface and
    back are pooled and their 95th percentile taken (medpy's ``hd95``, as used by nnU-Net's
    BraTS evaluation).

    Conventions: both masks empty -> 0.0; exactly one empty -> ``empty_value`` (NaN by
    default; the BraTS 2020 scheme uses 373.13, its grid diagonal).

    Args:
        pred: ``(X, Y, Z)`` predicted mask.
        ref: ``(X, Y, Z)`` reference mask.
        spacing: voxel size along X, Y, Z.
        empty_value: the score when exactly one mask is empty.
    """
    from scipy import ndimage

    p, r = _pair(pred, ref)
    p = p.cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
    r = r.cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)
    if len(spacing) != p.ndim or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be {p.ndim} positive values, got {tuple(spacing)}")
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 0.0
    if not (has_p and has_r):
        return float(empty_value)
    sp, sr = _surface(p), _surface(r)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


BRATS_HD95_EMPTY = 373.13  # mm: the BraTS 2020 scheme's score when exactly one mask is empty


def target_scores(pred_label: np.ndarray, ref_label: np.ndarray, targets: Any,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Per-target scores of a label map against a reference, both in the source convention.

    For each target ``t`` (``ossnet.targets.TargetSpec``): ``dice_<t>``, ``iou_<t>``, ``hd95_<t>``
    (mm) and the voxel counts ``tp_<t>``, ``fp_<t>``, ``fn_<t>`` (summed over cases they give
    the pooled, "global" Dice of LiTS). Conventions of the BraTS 2020 scheme: both regions empty
    score Dice 1 and HD95 0; exactly one empty scores Dice 0 and HD95 373.13 mm.

    Args:
        pred_label, ref_label: ``(X, Y, Z)`` label maps.
        targets: the ``TargetSpec`` that reads them.
        spacing: voxel size in mm.
    """
    out: dict[str, float] = {}
    for name, pred, ref in zip(targets.names, targets.region_masks(pred_label), targets.region_masks(ref_label)):
        out.update(count_scores(name, confusion_counts(pred, ref)))
        out[f"hd95_{name}"] = hd95(pred, ref, spacing, empty_value=BRATS_HD95_EMPTY)
    return out


def count_scores(name: str, counts: ConfusionCounts) -> dict[str, float]:
    """``dice_<name>``, ``iou_<name>`` and the counts ``tp_/fp_/fn_<name>`` of one target, as
    :func:`target_scores` gives them (for counts computed elsewhere, chunk by chunk)."""
    return {f"dice_{name}": dice_of(counts), f"iou_{name}": iou_of(counts),
            f"tp_{name}": float(counts.tp), f"fp_{name}": float(counts.fp), f"fn_{name}": float(counts.fn)}


def pooled_dice(scores: Sequence[Mapping[str, float]], name: str) -> float:
    """Dice of target ``name`` over all voxels of all cases (LiTS' "global" Dice), from
    :func:`target_scores` of each case."""
    tp, fp, fn = (int(sum(s[f"{k}_{name}"] for s in scores)) for k in ("tp", "fp", "fn"))
    return dice_of(ConfusionCounts(tp=tp, fp=fp, fn=fn, tn=0))


def collapse_warning(pred_voxels: Sequence[int], ref_voxels: Sequence[int], min_ratio: float = 0.1) -> str | None:
    """Say whether predictions have collapsed towards all background, or None when they have not.

    Collapse: the reference has foreground but the predictions hold none, or the predicted
    foreground over all cases is below ``min_ratio`` of the reference's.

    Args:
        pred_voxels: predicted foreground voxels per case.
        ref_voxels: reference foreground voxels per case (same order).
        min_ratio: smallest accepted predicted/reference volume ratio.

    Returns:
        A one-line description, or None.
    """
    if len(pred_voxels) != len(ref_voxels):
        raise ValueError(f"collapse check: {len(pred_voxels)} predictions for {len(ref_voxels)} references")
    pred, ref = int(sum(pred_voxels)), int(sum(ref_voxels))
    if ref == 0:
        return None
    empty = sum(1 for p, r in zip(pred_voxels, ref_voxels) if r > 0 and p == 0)
    with_ref = sum(1 for r in ref_voxels if r > 0)
    if pred == 0:
        return f"no foreground predicted on any of {len(ref_voxels)} cases while the reference has {ref} voxels"
    if pred < min_ratio * ref:
        return (f"predicted foreground is {pred / ref:.3f} of the reference's ({pred} vs {ref} voxels; "
                f"{empty} of {with_ref} cases with a reference predicted empty)")
    return None


__all__ = [
    "ConfusionCounts", "collapse_warning", "confusion_counts", "dice", "dice_of", "hd95", "iou", "iou_of", "volume_ml",
]
