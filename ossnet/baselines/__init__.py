"""Voxel-wise baselines from the paper: 3D and 2D (slice-wise) residual U-Nets."""

from __future__ import annotations

from ossnet.baselines.unet2d import ResidualUNet2D, predict_volume_slicewise, slices_to_volume, volume_to_slices
from ossnet.baselines.unet3d import ResidualUNet3D

__all__ = [
    "ResidualUNet2D",
    "ResidualUNet3D",
    "predict_volume_slicewise",
    "slices_to_volume",
    "volume_to_slices",
]
