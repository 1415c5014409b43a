"""2D slice-wise residual U-Net baseline (the paper's "2D residual U-Net", Tables 1 and 2).

The network is the 3D baseline's design in 2D (same residual units, widths and depth). A volume
is segmented slice by slice along one array axis; the paper reports the best of the three axes.

Fairness note: base 16 channels (16-32-64-128-256), two residual units per level, as in the
paper's baseline. Never widen it to flatter a memory or accuracy comparison.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ossnet.baselines._resunet import ResidualUNet

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)


class ResidualUNet2D(ResidualUNet):
    """2D residual U-Net: ``(B, C, H, W) -> logits (B, out_channels, H, W)``.

    Same design as ``ResidualUNet3D`` in two dimensions; odd sizes are padded internally and
    cropped back. Sized fairly (base 16, two residual units per level): never widen it.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary segmentation).
        channels: channels per level (tests may pass tiny widths for speed).
        units_per_level: residual units per level.
        downsampling: "maxpool" or "stride".
        upsampling: "transpose" or "interpolate" (bilinear + 1x1 conv).
        activation: activation name.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        units_per_level: int = 2,
        downsampling: str = "maxpool",
        upsampling: str = "transpose",
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__(
            2,
            in_channels,
            out_channels,
            channels=channels,
            units_per_level=units_per_level,
            downsampling=downsampling,
            upsampling=upsampling,
            activation=activation,
        )


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis: must be 0, 1 or 2 (X, Y, Z), got {axis}")
    return axis


def volume_to_slices(volume: Tensor, axis: int) -> Tensor:
    """Cut a channels-first volume into 2D slices along a spatial axis.

    Args:
        volume: ``[C, X, Y, Z]``.
        axis: spatial axis to slice along (0 = X, 1 = Y, 2 = Z).

    Returns:
        ``[S, C, H, W]`` where ``S`` is the size along ``axis`` and ``(H, W)`` are the two other
        spatial axes in their original order.
    """
    if volume.dim() != 4:
        raise ValueError(f"volume: expected [C, X, Y, Z], got shape {tuple(volume.shape)}")
    return volume.movedim(_check_axis(axis) + 1, 0)


def slices_to_volume(slices: Tensor, axis: int) -> Tensor:
    """Inverse of ``volume_to_slices``: ``[S, C, H, W] -> [C, X, Y, Z]``."""
    if slices.dim() != 4:
        raise ValueError(f"slices: expected [S, C, H, W], got shape {tuple(slices.shape)}")
    return slices.movedim(0, _check_axis(axis) + 1)


def predict_volume_slicewise(
    model: nn.Module,
    image: np.ndarray | Tensor,
    axis: int,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> Tensor:
    """Segment a volume slice by slice with a 2D model and reassemble the logits.

    The model runs in eval mode under ``torch.no_grad`` (its previous mode is restored).

    Args:
        model: a 2D network mapping ``[B, C, H, W]`` to ``[B, K, H, W]`` logits.
        image: ``(C, X, Y, Z)`` normalised volume (numpy or torch).
        axis: spatial axis to slice along (0 = X, 1 = Y, 2 = Z).
        batch_size: slices per forward pass (bounds memory).
        device: where the model runs; default: the device of the model's first parameter.

    Returns:
        Logits ``[K, X, Y, Z]`` float32 on the CPU (``K`` = model output channels).
    """
    _check_axis(axis)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    volume = torch.as_tensor(image)
    if volume.dim() != 4:
        raise ValueError(f"image: expected (C, X, Y, Z), got shape {tuple(volume.shape)}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    slices = volume_to_slices(volume.float(), axis)
    outputs: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, slices.shape[0], batch_size):
                chunk = slices[start : start + batch_size].to(device)
                outputs.append(model(chunk).float().cpu())
    finally:
        model.train(was_training)
    return slices_to_volume(torch.cat(outputs, dim=0), axis).contiguous()


__all__ = [
    "DEFAULT_CHANNELS",
    "ResidualUNet2D",
    "predict_volume_slicewise",
    "slices_to_volume",
    "volume_to_slices",
]
