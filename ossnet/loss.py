"""OSS-Net training loss: point BCE plus alpha times BCE of the low-resolution map.

``L = mean_points BCE(o, f(p, x, z)) + alpha * mean_cells BCE(y, f_e(x))``. With the same number
of points per volume (and the same low-res grid), global means equal the paper's per-volume means
averaged over the mini-batch. Multi-target models (``ossnet.targets``) take one BCE per region,
or a cross-entropy over exclusive classes, for the points, and one BCE per low-res channel for
the auxiliary term, optionally weighted per target.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor


class LossTerms(NamedTuple):
    """Loss and its parts (all scalar tensors).

    Attributes:
        total: ``point + alpha * aux``: what to backpropagate.
        point: mean BCE over query points.
        aux: unweighted mean BCE over low-res cells; 0 without a low-res head or when alpha == 0.
    """

    total: Tensor
    point: Tensor
    aux: Tensor


def ossnet_loss(
    point_logits: Tensor,
    point_labels: Tensor,
    lowres_logits: Tensor | None,
    lowres_labels: Tensor | None,
    alpha: float,
    kind: str = "binary",
    weights: Sequence[float] | None = None,
) -> LossTerms:
    """Compute the OSS-Net loss from logits.

    Args:
        point_logits: ``[B, N]`` decoder logits (binary), ``[B, N, K]`` (regions, classes).
        point_labels: binary ``[B, N]`` in {0, 1}; regions ``[B, N, K]`` in {0, 1}; classes
            ``[B, N]`` class indices (see ``ossnet.targets.TargetSpec.point_targets``).
        lowres_logits: ``[B, K, x, y, z]`` low-res head logits, or None (O-Net, A, B).
        lowres_labels: max-pooled labels, binary ``[B, x, y, z]``, else ``[B, K, x, y, z]`` (one
            channel per output); required when the head is present and ``alpha > 0``.
        alpha: weight of the auxiliary term (paper: 0.1), >= 0.
        kind: "binary", "regions" (a BCE per target) or "classes" (cross-entropy over K).
        weights: optional per-output weights (K of them); the loss is their weighted mean, so
            equal weights give the plain mean.

    Returns:
        ``LossTerms``.

    Raises:
        ValueError: shape mismatch, negative alpha or weight, or missing low-res labels.
    """
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    if kind == "regions" and point_logits.dim() == 2:
        kind = "binary"  # one region: the model's single output is squeezed
    k = 1 if kind == "binary" else int(point_logits.shape[-1])
    w = None
    if weights is not None:
        if len(weights) != k or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights: need {k} non-negative weights, not all 0, got {list(weights)}")
        w = point_logits.new_tensor([float(x) for x in weights])
    if kind == "classes":
        if point_logits.shape[:-1] != point_labels.shape:
            raise ValueError(f"labels: shape {list(point_labels.shape)} does not match point logits "
                             f"{list(point_logits.shape)} (expected [B, N] class indices for [B, N, K])")
        point = F.cross_entropy(point_logits.reshape(-1, k), point_labels.reshape(-1).long(), weight=w)
    else:
        if point_logits.shape != point_labels.shape:
            raise ValueError(
                f"labels: shape {list(point_labels.shape)} does not match point logits {list(point_logits.shape)}"
            )
        point = _weighted_bce(point_logits, point_labels, w, channel_dim=-1)
    zero = point.new_zeros(())
    if lowres_logits is None:
        return LossTerms(point, point, zero)
    if alpha == 0:
        # A zero-weighted term keeps the head in the autograd graph: DDP without
        # find_unused_parameters fails when a parameter gets no gradient.
        return LossTerms(point + lowres_logits.float().mul(0.0).sum(), point, zero)
    if lowres_labels is None:
        raise ValueError("label_lowres: required for the auxiliary loss (alpha > 0) but missing")
    logits = lowres_logits.squeeze(1) if kind == "binary" else lowres_logits
    if logits.shape != lowres_labels.shape or lowres_logits.dim() != 5 or lowres_logits.shape[1] != k:
        expected = "[B, 1, x, y, z] vs [B, x, y, z]" if kind == "binary" else f"[B, {k}, x, y, z] for both"
        raise ValueError(
            f"label_lowres: shape {list(lowres_labels.shape)} does not match low-res logits "
            f"{list(lowres_logits.shape)} (expected {expected})"
        )
    aux = _weighted_bce(logits, lowres_labels, w, channel_dim=1)
    return LossTerms(point + alpha * aux, point, aux)


def _weighted_bce(logits: Tensor, labels: Tensor, weights: Tensor | None, channel_dim: int) -> Tensor:
    """Mean BCE; with ``weights`` (one per channel along ``channel_dim``) their weighted mean."""
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    shape = [1] * per.dim()
    shape[channel_dim] = -1
    w = weights.to(per.dtype).reshape(shape)
    return (per * w).mean() / w.mean()


__all__ = ["LossTerms", "ossnet_loss"]
