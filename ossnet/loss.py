"""OSS-Net training loss: point BCE plus alpha times BCE of the low-resolution map.

``L = mean_points BCE(o, f(p, x, z)) + alpha * mean_cells BCE(y, f_e(x))``. With the same number
of points per volume (and the same low-res grid), global means equal the paper's per-volume means
averaged over the mini-batch.
"""

from __future__ import annotations

from typing import NamedTuple

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
) -> LossTerms:
    """Compute the OSS-Net loss from logits.

    Args:
        point_logits: ``[B, N]`` decoder logits.
        point_labels: ``[B, N]`` occupancy targets in {0, 1} (any numeric dtype).
        lowres_logits: ``[B, 1, x, y, z]`` low-res head logits, or None (O-Net, A, B).
        lowres_labels: ``[B, x, y, z]`` max-pooled labels, or None; required when the head is present
            and ``alpha > 0``.
        alpha: weight of the auxiliary term (paper: 0.1), >= 0.

    Returns:
        ``LossTerms``.

    Raises:
        ValueError: shape mismatch, negative alpha or missing low-res labels.
    """
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    if point_logits.shape != point_labels.shape:
        raise ValueError(
            f"labels: shape {list(point_labels.shape)} does not match point logits {list(point_logits.shape)}"
        )
    point = F.binary_cross_entropy_with_logits(point_logits, point_labels.to(point_logits.dtype))
    zero = point.new_zeros(())
    if lowres_logits is None:
        return LossTerms(point, point, zero)
    if alpha == 0:
        # A zero-weighted term keeps the head in the autograd graph: DDP without
        # find_unused_parameters fails when a parameter gets no gradient.
        return LossTerms(point + lowres_logits.float().mul(0.0).sum(), point, zero)
    if lowres_labels is None:
        raise ValueError("label_lowres: required for the auxiliary loss (alpha > 0) but missing")
    logits = lowres_logits.squeeze(1)
    if logits.shape != lowres_labels.shape or lowres_logits.dim() != 5 or lowres_logits.shape[1] != 1:
        raise ValueError(
            f"label_lowres: shape {list(lowres_labels.shape)} does not match low-res logits "
            f"{list(lowres_logits.shape)} (expected [B, 1, x, y, z] vs [B, x, y, z])"
        )
    aux = F.binary_cross_entropy_with_logits(logits, lowres_labels.to(logits.dtype))
    return LossTerms(point + alpha * aux, point, aux)


__all__ = ["LossTerms", "ossnet_loss"]
