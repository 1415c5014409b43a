"""Reversible per-case preprocessing: validation, z-score and label mapping, plus the in-memory
path through the case geometry (``ossnet.geometry``: orientation, resampling, crop/pad).

Pure numpy. Everything that changes a volume's geometry or intensities is recorded in a
``PreprocessRecord`` so inference can map predictions back onto the source file's voxel grid.
Intensities are z-scored per channel *before* the geometry steps, over the whole source volume
(``"all"``) or over its nonzero voxels (``"nonzero"``, which keeps the zero background at 0).
Work is done in slabs along the first spatial axis so a 512^3 channel needs no full-size
temporaries beyond its own float32 copy. ``ossnet_pipelines.volumes`` runs the same transform lazily
and chunk by chunk for scans that do not fit in memory.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ossnet.geometry import (
    ZSCORE_MASKS,
    Box,
    PreprocessRecord,
    check_zscore_mask,
    apply_orientation,
    crop_or_pad,
    crop_pad_box,
    invert_orientation,
    orientation_affine,
    undo_crop_or_pad,
)

logger = logging.getLogger(__name__)
_SLAB_ELEMENTS = 1 << 24  # ~16M voxels per slab bounds every temporary to 64 MiB of float32


def _slabs(n: int, plane: int) -> Iterator[slice]:
    """Slices along the first axis holding about ``_SLAB_ELEMENTS`` elements each."""
    step = max(1, _SLAB_ELEMENTS // max(1, plane))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_spatial_shape(shape: Sequence[int], name: str = "volume") -> tuple[int, int, int]:
    """Check that ``shape`` describes a 3D volume; return the 3D shape.

    Trailing singleton dimensions (e.g. ``(X, Y, Z, 1)``, common in NIfTI exports) are dropped.

    Raises:
        ValueError: for 2D images, 4D+ images with more than one volume, or an axis of size 1.
    """
    dims = list(int(s) for s in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        kind = f"{len(dims)}D"
        raise ValueError(f"{name}: expected a 3D volume, got a {kind} image of shape {tuple(int(s) for s in shape)}")
    if any(d < 2 for d in dims):
        raise ValueError(f"{name}: expected a 3D volume, got shape {tuple(dims)} (an axis of size < 2: a 2D image?)")
    return dims[0], dims[1], dims[2]


def validate_finite(array: np.ndarray, name: str = "volume") -> None:
    """Raise ``ValueError`` if ``array`` holds NaN or Inf (checked slab-wise, no full-size mask)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    plane = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
    for sl in _slabs(array.shape[0], plane):
        part = array[sl]
        if not np.isfinite(part).all():
            n_nan = int(np.isnan(part).sum())
            n_inf = int(np.isinf(part).sum())
            raise ValueError(f"{name}: non-finite voxels (NaN: {n_nan}, Inf: {n_inf} in slab {sl.start}:{sl.stop})")


def validate_volume(array: np.ndarray, name: str = "volume") -> np.ndarray:
    """Check a 3D intensity volume (dimensionality, finiteness); return it squeezed to 3D.

    Args:
        array: ``(X, Y, Z)`` or ``(X, Y, Z, 1)`` intensities.
        name: what to call it in error messages (usually the file path).
    """
    shape = validate_spatial_shape(array.shape, name)
    array = array.reshape(shape)
    validate_finite(array, name)
    return array


def label_values(label: np.ndarray, name: str = "label") -> set[int]:
    """The set of values in an integer-valued label volume.

    Raises:
        ValueError: for NaN/Inf or non-integer values (e.g. 0.5), naming ``name``.
    """
    present: set[int] = set()
    plane = int(np.prod(label.shape[1:])) if label.ndim > 1 else 1
    floating = np.issubdtype(label.dtype, np.floating)
    for sl in _slabs(label.shape[0], plane):
        part = label[sl]
        if floating:
            if not np.isfinite(part).all():
                raise ValueError(f"{name}: label holds NaN or Inf values")
            frac = part != np.round(part)
            if frac.any():
                bad = np.unique(part[frac])[:3]
                raise ValueError(f"{name}: non-integer label values, e.g. {', '.join(f'{v:g}' for v in bad)}")
        ints = part.astype(np.int64, copy=False)
        lo, hi = int(ints.min()), int(ints.max())
        if lo < 0 or hi > 4095:
            present.update(int(v) for v in np.unique(ints))
        else:
            present.update(int(v) for v in np.flatnonzero(np.bincount(ints.ravel(), minlength=1)))
    return present


def validate_label_values(label: np.ndarray, allowed: Iterable[int], name: str = "label") -> set[int]:
    """Check that a label holds only integer values from ``allowed``; return the values present.

    Raises:
        ValueError: non-finite, non-integer or unexpected values, naming ``name``.
    """
    allowed_set = {int(v) for v in allowed}
    present = label_values(label, name)
    unexpected = sorted(present - allowed_set)
    if unexpected:
        shown = ", ".join(str(v) for v in unexpected[:8])
        raise ValueError(
            f"{name}: unexpected label values [{shown}] (allowed: {', '.join(str(v) for v in sorted(allowed_set))})"
        )
    return present


def binarize_label(label: np.ndarray, foreground: Iterable[int] | None = None) -> np.ndarray:
    """Map a label to {0, 1} uint8: ``label > 0`` (default) or membership in ``foreground``.

    BraTS labels {1, 2, 4} become whole tumour; LiTS {1, 2} become liver + tumour.
    """
    if foreground is None:
        return (label > 0).astype(np.uint8)
    return np.isin(label, np.asarray(list(foreground))).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Intensity normalisation
# --------------------------------------------------------------------------------------------


def zscore_stats(x: np.ndarray, mask: str = "nonzero") -> tuple[float, float]:
    """Mean and standard deviation of one channel over its mask, in float64, slab-wise.

    Args:
        x: ``(X, Y, Z)`` intensities.
        mask: ``"nonzero"`` (voxels != 0) or ``"all"``.

    Returns:
        ``(mean, std)``; ``(0.0, 1.0)`` for an empty mask and std 1.0 for a constant channel,
        so normalising never divides by zero.
    """
    check_zscore_mask(mask)
    plane = int(np.prod(x.shape[1:]))
    count, total = 0, 0.0
    for sl in _slabs(x.shape[0], plane):
        part = x[sl]
        vals = part[part != 0] if mask == "nonzero" else part
        count += vals.size
        total += float(vals.sum(dtype=np.float64))
    if count == 0:
        logger.warning("z-score: empty %s mask; using mean 0, std 1", mask)
        return 0.0, 1.0
    mean = total / count
    sq = 0.0
    for sl in _slabs(x.shape[0], plane):
        part = x[sl]
        vals = part[part != 0] if mask == "nonzero" else part
        sq += float(np.square(vals.astype(np.float64) - mean).sum())
    std = math.sqrt(sq / count)
    if std < 1e-8:
        logger.warning("z-score: constant channel (value %g); using std 1", mean)
        std = 1.0
    return mean, std


def zscore_channel(x: np.ndarray, mask: str = "nonzero", *, inplace: bool = False) -> tuple[np.ndarray, float, float]:
    """Z-score one channel over its mask; voxels outside a ``"nonzero"`` mask stay 0.

    Args:
        x: ``(X, Y, Z)`` intensities; must be float32 when ``inplace``.
        mask: ``"nonzero"`` or ``"all"``.
        inplace: overwrite ``x`` (saves one full-size copy).

    Returns:
        ``(normalised float32 (X, Y, Z), mean, std)``.
    """
    mean, std = zscore_stats(x, mask)
    if inplace:
        if x.dtype != np.float32:
            raise ValueError(f"zscore_channel: inplace needs float32, got {x.dtype}")
        out = x
    else:
        out = np.empty(x.shape, dtype=np.float32)
    plane = int(np.prod(x.shape[1:]))
    for sl in _slabs(x.shape[0], plane):
        part = x[sl]
        zero = part == 0 if mask == "nonzero" else None
        norm = ((part - mean) / std).astype(np.float32, copy=False)
        if zero is not None:
            norm[zero] = 0.0
        out[sl] = norm
    return out, mean, std


def zscore_channels(
    image: np.ndarray, mask: str | np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """Per-channel z-score of a ``(C, X, Y, Z)`` image.

    Args:
        image: ``(C, X, Y, Z)`` intensities.
        mask: ``None`` or ``"nonzero"`` (each channel's nonzero voxels; zeros stay 0), ``"all"``,
            or a boolean ``(X, Y, Z)`` foreground mask (voxels outside it become 0).

    Returns:
        ``(normalised float32 (C, X, Y, Z), means (C,), stds (C,))``.
    """
    if image.ndim != 4:
        raise ValueError(f"zscore_channels: expected (C, X, Y, Z), got shape {image.shape}")
    out = np.empty(image.shape, dtype=np.float32)
    means: list[float] = []
    stds: list[float] = []
    for c in range(image.shape[0]):
        if isinstance(mask, np.ndarray):
            if mask.shape != image.shape[1:]:
                raise ValueError(f"zscore_channels: mask shape {mask.shape} != image shape {image.shape[1:]}")
            vals = image[c][mask].astype(np.float64)
            mean = float(vals.mean()) if vals.size else 0.0
            std = float(vals.std()) if vals.size else 1.0
            std = std if std >= 1e-8 else 1.0
            out[c] = np.where(mask, (image[c] - mean) / std, 0.0)
        else:
            out[c], mean, std = zscore_channel(image[c], "nonzero" if mask is None else mask)
        means.append(mean)
        stds.append(std)
    return out, tuple(means), tuple(stds)


def invert_zscore(
    image: np.ndarray, means: Sequence[float], stds: Sequence[float], mask: str = "nonzero"
) -> np.ndarray:
    """Undo ``zscore_channels`` on a ``(C, ...)`` image; returns float32.

    With the ``"nonzero"`` mask, normalised zeros map back to 0 (the background; a foreground
    voxel exactly at the mean is indistinguishable from it).
    """
    check_zscore_mask(mask)
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        restored = x * np.float32(stds[c]) + np.float32(means[c])
        out[c] = np.where(x != 0, restored, 0.0) if mask == "nonzero" else restored
    return out


def preprocess_channel(x: np.ndarray, record: PreprocessRecord, *, name: str = "volume") -> tuple[np.ndarray, float, float]:
    """Validate, z-score and move one source channel onto the model grid.

    Args:
        x: ``(X, Y, Z)`` source intensities (any numeric dtype; float32 is normalised in place).
        record: geometry of the case (``PreprocessRecord.create``).
        name: file name for error messages.

    Returns:
        ``(grid float32 (X', Y', Z'), mean, std)``.
    """
    x = validate_volume(x, name)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    normed, mean, std = zscore_channel(x, record.zscore_mask, inplace=True)
    return np.ascontiguousarray(record.to_grid(normed, dtype=np.float32)), mean, std


def preprocess_image(
    channels: Sequence[np.ndarray] | np.ndarray,
    affine: Any,
    orientation: Any,
    volume_shape: Sequence[int],
    *,
    zscore_mask: str = "nonzero",
) -> tuple[np.ndarray, PreprocessRecord]:
    """In-memory preprocessing of a multi-channel source image (inference on NIfTI, tests).

    Args:
        channels: ``C`` arrays ``(X, Y, Z)`` or one ``(C, X, Y, Z)`` array in source geometry.
        affine: source voxel -> world affine (4x4).
        orientation: ``(3, 2)`` source -> RAS transform (``nibabel.io_orientation(affine)``).
        volume_shape: model grid.
        zscore_mask: ``"nonzero"`` or ``"all"``.

    Returns:
        ``(image float32 (C, *volume_shape), record)``.
    """
    shape = validate_spatial_shape(np.shape(channels[0]), "channel 0")
    record = PreprocessRecord.create(shape, affine, orientation, volume_shape, zscore_mask)
    out = np.empty((len(channels),) + record.volume_shape, dtype=np.float32)
    means, stds = [], []
    for c, x in enumerate(channels):
        x = np.array(x, dtype=np.float32)  # a private copy: normalised in place
        if validate_spatial_shape(x.shape, f"channel {c}") != shape:
            raise ValueError(f"channel {c}: shape {x.shape} != channel 0 shape {shape}")
        out[c], mean, std = preprocess_channel(x, record, name=f"channel {c}")
        means.append(mean)
        stds.append(std)
    return out, record.with_stats(means, stds)


def preprocess_label(
    label: np.ndarray, record: PreprocessRecord, allowed: Iterable[int], *, name: str = "label"
) -> tuple[np.ndarray, int]:
    """Validate a source label, binarise it (label > 0) and move it onto the model grid.

    Returns:
        ``(grid uint8 (X', Y', Z'), foreground voxels lost to cropping)``.
    """
    shape = validate_spatial_shape(label.shape, name)
    label = label.reshape(shape)
    if shape != record.original_shape:
        raise ValueError(f"{name}: label shape {shape} != image shape {record.original_shape}")
    validate_label_values(label, allowed, name)
    binary = binarize_label(label)
    total = int(binary.sum(dtype=np.int64))
    grid = np.ascontiguousarray(record.to_grid(binary, order=0, dtype=np.uint8))
    lost = total - int(grid.sum(dtype=np.int64))
    return grid, lost


__all__ = [
    "Box",
    "PreprocessRecord",
    "ZSCORE_MASKS",
    "apply_orientation",
    "binarize_label",
    "crop_or_pad",
    "crop_pad_box",
    "invert_orientation",
    "invert_zscore",
    "label_values",
    "orientation_affine",
    "preprocess_channel",
    "preprocess_image",
    "preprocess_label",
    "undo_crop_or_pad",
    "validate_finite",
    "validate_label_values",
    "validate_spatial_shape",
    "validate_volume",
    "zscore_channel",
    "zscore_channels",
    "zscore_stats",
]
