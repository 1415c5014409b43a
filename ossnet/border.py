"""The border band around a label's boundary, for border sampling (numpy and scipy only).

It lives apart from ``ossnet.sampling`` (which needs torch for patches) so that ingest, which
stores the band with every case, runs without importing torch (about 480 MB of resident memory).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ossnet.targets import TargetSpec


def border_band(label: np.ndarray, band_width: int = 6) -> np.ndarray:
    """Band of voxels around the label boundary.

    Voxels where the Sobel gradient magnitude of the binary label is non-zero, dilated by a
    ``(2 * band_width + 1)^3`` max filter (``band_width = 6`` gives the paper's 13^3 band).
    Only the label's bounding box (plus a margin) is filtered, so small lesions are cheap.
    The Sobel filters run in exact integer arithmetic.

    Args:
        label: (X, Y, Z) label; foreground is ``label > 0``.
        band_width: half-width of the dilation in voxels (>= 0).

    Returns:
        (X, Y, Z) bool mask, empty when the label is empty or fills the whole volume.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label: expected shape (X, Y, Z), got {label.shape}")
    if band_width < 0:
        raise ValueError(f"band_width: must be >= 0, got {band_width}")
    foreground = label > 0
    band = np.zeros(label.shape, dtype=bool)
    # A Sobel response needs a foreground voxel within 1 voxel; the dilation adds band_width,
    # and the filters read one more voxel: a margin of band_width + 2 keeps the crop exact.
    margin = band_width + 2
    box = []
    for axis in range(3):
        occupied = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        if occupied.size == 0:
            return band
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + margin + 1, label.shape[axis])))
    crop = foreground[tuple(box)].view(np.uint8)
    edge = np.zeros(crop.shape, dtype=bool)
    for axis in range(3):
        # 'reflect' (scipy's default, as in the reference) adds no edge at the volume border.
        edge |= ndimage.sobel(crop, axis=axis, output=np.int16, mode="reflect") != 0
    if band_width > 0:
        edge = ndimage.maximum_filter(edge.view(np.uint8), size=2 * band_width + 1, mode="constant", cval=0) > 0
    band[tuple(box)] = edge
    return band


def target_bands(label: np.ndarray, targets: TargetSpec, band_width: int = 6) -> np.ndarray:
    """Border bands of every target of a label in the source convention, as one bit mask.

    Binary targets: :func:`border_band` of ``label > 0`` (0/1). Otherwise bit ``t`` of each voxel
    is set when it lies in the band of target ``t``'s region (up to 8 targets), so border
    sampling can draw from each target's own boundary and small targets get their share.

    Returns:
        (X, Y, Z) uint8.
    """
    if targets.kind == "binary":
        return border_band(label, band_width).view(np.uint8)
    out = np.zeros(np.shape(label), dtype=np.uint8)
    for t, region in enumerate(targets.region_masks(label)):
        out |= border_band(region, band_width).view(np.uint8) << t
    return out


__all__ = ["border_band", "target_bands"]
