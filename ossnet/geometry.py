"""The geometry of a case: source voxel grid <-> model grid, forward and exact inverse.

A ``PreprocessRecord`` describes how a scan reaches the model grid and how a prediction goes
back, as three steps applied to the last three (spatial) axes:

1. **reorient** to RAS: flips and a transpose (nibabel's ``io_orientation``; the closest
   canonical axes, so an oblique scan keeps its voxel grid and its affine);
2. **resample** (``resample`` mode): ``"none"`` keeps the voxel grid; ``"resize"`` stretches the
   RAS volume onto the model grid (the paper's LiTS recipe: every volume becomes 512^3);
   ``"spacing"`` resamples to a target voxel spacing in mm (nnU-Net's habit), the grid then
   follows by cropping or padding;
3. **crop or pad**, centred, onto the model grid.

The inverse runs the steps backwards. Resampling maps voxel centres (``align_corners=False``):
output voxel ``j`` of an axis resized from ``n`` to ``m`` voxels samples the input at
``(j + 0.5) * n / m - 0.5``, linearly (order 1: images, probabilities) or from the nearest
voxel (order 0: labels). An axis whose size does not change is never touched, so ``"none"``
without cropping is exact.

Every function here is array-generic: it uses slicing, fancy indexing along one axis,
``np.flip``/``np.pad``/``np.where`` and arithmetic only, so it runs on NumPy arrays and, through
NumPy's dispatch protocol, lazily on dask arrays (``ossnet_pipelines.volumes`` builds the chunked,
out-of-core version of the same transform that way, without this module importing dask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence, cast

import numpy as np

Box = tuple[tuple[int, int, int, int], ...]
"""Per spatial axis ``(src_start, src_stop, dst_start, dst_stop)`` of a crop/pad."""

RESAMPLE_MODES: tuple[str, ...] = ("none", "resize", "spacing")
ZSCORE_MASKS: tuple[str, ...] = ("nonzero", "all")
MAX_GRID_VOXELS = 1 << 30
"""Largest resampled grid accepted (1.07e9 voxels, 4 GiB as float32): a target spacing that
would exceed it is a configuration error, not a job that runs out of memory hours later."""
SHEAR_TOLERANCE = 1e-3
"""Largest |cosine| between two voxel axes of an affine still treated as orthogonal."""


# --------------------------------------------------------------------------------------------
# Orientation (numpy equivalents of nibabel.orientations, so ossnet stays nibabel-free)
# --------------------------------------------------------------------------------------------


def _as_ornt(ornt: Any) -> np.ndarray:
    arr = np.asarray(ornt, dtype=np.float64)
    if arr.shape != (3, 2) or np.isnan(arr).any():
        raise ValueError(f"orientation: expected a (3, 2) axis/flip array, got {arr.tolist()}")
    if sorted(int(a) for a in arr[:, 0]) != [0, 1, 2] or not set(arr[:, 1].tolist()) <= {1.0, -1.0}:
        raise ValueError(f"orientation: not a permutation with flips: {arr.tolist()}")
    return arr.astype(np.int64)


def apply_orientation(volume: Any, ornt: Any) -> Any:
    """Flip and transpose the last three axes as ``nibabel.orientations.apply_orientation``.

    Args:
        volume: ``(..., X, Y, Z)`` (NumPy or dask).
        ornt: ``(3, 2)``: row ``i`` sends source axis ``i`` to axis ``ornt[i, 0]``, flipped if
            ``ornt[i, 1] == -1``.

    Returns:
        A view (no copy; lazy for dask) with reoriented spatial axes.
    """
    o = _as_ornt(ornt)
    lead = volume.ndim - 3
    out = volume
    for ax in range(3):
        if o[ax, 1] == -1:
            out = np.flip(out, axis=lead + ax)
    perm = list(range(lead)) + [lead + int(a) for a in np.argsort(o[:, 0])]
    return out.transpose(perm)


def invert_orientation(ornt: Any) -> np.ndarray:
    """The ``(3, 2)`` orientation undoing ``ornt``: ``apply(apply(v, o), invert(o)) == v``."""
    o = _as_ornt(ornt)
    inv = np.zeros((3, 2), dtype=np.int64)
    for i in range(3):
        inv[o[i, 0]] = (i, o[i, 1])
    return inv


def orientation_affine(ornt: Any, shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-voxel affine from the reoriented array back to the source array.

    Equals ``nibabel.orientations.inv_ornt_aff(ornt, shape)``; ``shape`` is the source shape.
    """
    o = _as_ornt(ornt)
    shp = np.asarray(shape[:3], dtype=np.float64)
    undo_reorder = np.eye(4)[list(o[:, 0]) + [3], :]
    undo_flip = np.diag(list(o[:, 1].astype(np.float64)) + [1.0])
    center_trans = -(shp - 1) / 2.0
    undo_flip[:3, 3] = o[:, 1] * center_trans - center_trans
    return undo_flip @ undo_reorder


def voxel_spacing(affine: Any, name: str = "affine") -> tuple[float, float, float]:
    """Voxel size along each voxel axis (the affine's column norms), checked.

    Raises:
        ValueError: a zero, non-finite or sheared affine (voxel axes not orthogonal within
            ``SHEAR_TOLERANCE``), naming ``name``. Rotated (oblique) affines are accepted.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"{name}: affine is not a finite 4x4 matrix")
    columns = a[:3, :3]
    zooms = np.sqrt((columns**2).sum(axis=0))
    if not (zooms > 0).all():
        raise ValueError(f"{name}: zero voxel spacing in the affine ({', '.join(f'{z:g}' for z in zooms)} mm)")
    unit = columns / zooms
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > SHEAR_TOLERANCE:
        raise ValueError(f"{name}: sheared affine (voxel axes {cosines.max():.3g} from orthogonal); "
                         "only rotated (oblique) grids are supported")
    return tuple(float(z) for z in zooms)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Resampling (separable, voxel-centre aligned)
# --------------------------------------------------------------------------------------------


def interpolation_plan(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which input voxels make each output voxel when an axis goes from ``n_in`` to ``n_out``.

    Returns:
        ``(lo, hi, weight)``: int64 ``(n_out,)`` indices and float32 ``(n_out,)`` weights; output
        ``j`` is ``v[lo[j]] * (1 - weight[j]) + v[hi[j]] * weight[j]`` (order 0: ``lo == hi``).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resample: axis sizes must be >= 1, got {n_in} -> {n_out}")
    if order not in (0, 1):
        raise ValueError(f"resample: order must be 0 (nearest) or 1 (linear), got {order}")
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)
    if order == 0:
        lo = np.clip(np.floor(centres), 0, n_in - 1).astype(np.int64)
        return lo, lo, np.zeros(n_out, dtype=np.float32)
    x = np.clip(centres - 0.5, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (x - lo).astype(np.float32)


def resample_axis(volume: Any, axis: int, n_out: int, order: int) -> Any:
    """Resample one axis of ``volume`` to ``n_out`` voxels (unchanged sizes return ``volume``).

    Order 1 computes in float32 (integer input is cast); order 0 keeps the dtype.
    """
    n_in = int(volume.shape[axis])
    if n_in == n_out:
        return volume
    lo, hi, weight = interpolation_plan(n_in, n_out, order)
    head = (slice(None),) * (axis % volume.ndim)
    if order == 0:
        return volume[head + (lo,)]
    if not np.issubdtype(volume.dtype, np.floating) or volume.dtype == np.float16:
        volume = volume.astype(np.float32)
    a, b = volume[head + (lo,)], volume[head + (hi,)]
    w = weight.reshape((-1,) + (1,) * (volume.ndim - 1 - axis % volume.ndim))
    return a + (b - a) * w


def resample(volume: Any, shape: Sequence[int], order: int) -> Any:
    """Resample the last three axes of ``volume`` to ``shape`` (separably, axis by axis)."""
    lead = volume.ndim - 3
    for axis, n_out in enumerate(shape):
        volume = resample_axis(volume, lead + axis, int(n_out), order)
    return volume


# --------------------------------------------------------------------------------------------
# Crop / pad
# --------------------------------------------------------------------------------------------


def crop_pad_box(in_shape: Sequence[int], out_shape: Sequence[int]) -> Box:
    """Centred crop/pad box mapping a grid of ``in_shape`` onto ``out_shape``.

    The offset per axis is ``ceil((out - in) / 2)``: padding puts the extra voxel before (as the
    reference BraTS loader does), cropping removes ``floor((in - out) / 2)`` voxels before.
    """
    box = []
    for n_in, n_out in zip(in_shape, out_shape):
        offset = -((int(n_in) - int(n_out)) // 2)  # ceil((out - in) / 2)
        src_start = max(0, -offset)
        dst_start = max(0, offset)
        length = min(int(n_in) - src_start, int(n_out) - dst_start)
        box.append((src_start, src_start + length, dst_start, dst_start + length))
    return tuple(box)


def apply_box(volume: Any, box: Box, out_shape: Sequence[int], fill: float = 0) -> Any:
    """Crop ``volume``'s last three axes to the box's source range and pad them onto ``out_shape``."""
    lead = volume.ndim - 3
    out = volume[(Ellipsis,) + tuple(slice(b[0], b[1]) for b in box)]
    widths = [(0, 0)] * lead + [(b[2], int(n) - b[3]) for b, n in zip(box, out_shape)]
    if any(w != (0, 0) for w in widths):
        out = np.pad(out, widths, mode="constant", constant_values=fill)
    return out


def undo_box(volume: Any, box: Box, original_shape: Sequence[int], fill: float = 0) -> Any:
    """Inverse of ``apply_box``: cropped-away voxels come back as ``fill``."""
    inverse = tuple((b[2], b[3], b[0], b[1]) for b in box)
    return apply_box(volume, inverse, original_shape, fill)


def crop_or_pad(
    volume: np.ndarray, shape: Sequence[int], *, fill: float = 0, dtype: Any = None
) -> tuple[np.ndarray, Box]:
    """Centre ``volume``'s last three axes on a grid of ``shape`` (crop where larger, pad where smaller).

    Args:
        volume: ``(..., X, Y, Z)``.
        shape: target ``(X', Y', Z')``.
        fill: value of padded voxels.
        dtype: output dtype (default: the input's).

    Returns:
        ``(out (..., X', Y', Z'), box)``; ``undo_crop_or_pad(out, volume.shape[-3:], box)`` restores
        the input geometry (cropped-away voxels come back as ``fill``).
    """
    if len(shape) != 3:
        raise ValueError(f"crop_or_pad: target shape must have 3 sizes, got {tuple(shape)}")
    box = crop_pad_box(volume.shape[-3:], shape)
    out = apply_box(volume, box, shape, fill)
    return np.ascontiguousarray(out, dtype=dtype or volume.dtype), box


def undo_crop_or_pad(volume: np.ndarray, original_shape: Sequence[int], box: Box, *, fill: float = 0) -> np.ndarray:
    """Inverse of ``crop_or_pad``: ``(..., X', Y', Z')`` back to ``(..., *original_shape)``."""
    box = cast(Box, tuple(tuple(int(v) for v in b) for b in box))
    return np.ascontiguousarray(undo_box(volume, box, original_shape[-3:], fill))


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def _tuple2(a: Any) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(a, dtype=np.float64))


def check_zscore_mask(mask: str) -> None:
    if mask not in ZSCORE_MASKS:
        raise ValueError(f"zscore mask: must be one of {', '.join(ZSCORE_MASKS)}, got {mask!r}")


def _resample_matrix(n_in: Sequence[int], n_out: Sequence[int]) -> np.ndarray:
    """Voxel affine from a resampled grid (``n_out``) back to the grid it came from (``n_in``)."""
    m = np.eye(4)
    for axis, (a, b) in enumerate(zip(n_in, n_out)):
        ratio = a / b
        m[axis, axis] = ratio
        m[axis, 3] = (ratio - 1.0) / 2.0
    return m


@dataclass(frozen=True)
class PreprocessRecord:
    """Everything needed to map a case between its source file and the model grid.

    Attributes:
        original_shape: spatial shape of the source file ``(X, Y, Z)``.
        original_affine: source voxel -> world (mm) affine, 4x4.
        orientation: ``(3, 2)`` axis/flip transform from source axes to RAS.
        volume_shape: the model grid ``(X', Y', Z')``.
        box: centred crop/pad box from the resampled RAS grid to the model grid.
        zscore_mask: ``"nonzero"`` or ``"all"``.
        means, stds: per-channel z-score statistics (empty for a label-only record).
        label_map: how labels became binary (``"nonzero"``: label > 0).
        resample: ``"none"``, ``"resize"`` or ``"spacing"`` (module docstring).
        resampled_shape: the RAS grid after resampling (the RAS shape for ``"none"``).
        target_spacing: the requested spacing in mm (``"spacing"`` only).
    """

    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    orientation: tuple[tuple[int, int], ...]
    volume_shape: tuple[int, int, int]
    box: Box
    zscore_mask: str = "nonzero"
    means: tuple[float, ...] = ()
    stds: tuple[float, ...] = ()
    label_map: str = "nonzero"
    resample: str = "none"
    resampled_shape: tuple[int, int, int] | None = None
    target_spacing: tuple[float, float, float] | None = None

    @classmethod
    def create(
        cls,
        original_shape: Sequence[int],
        original_affine: Any,
        orientation: Any,
        volume_shape: Sequence[int],
        zscore_mask: str = "nonzero",
        resample: str = "none",
        target_spacing: Sequence[float] | None = None,
        max_voxels: int = MAX_GRID_VOXELS,
    ) -> "PreprocessRecord":
        """Build the geometry part of a record (statistics are added with ``with_stats``).

        Raises:
            ValueError: unknown mode, a ``"spacing"`` mode without a valid target, a degenerate
                affine (checked for ``"spacing"``), or a resampled grid over ``max_voxels``.
        """
        check_zscore_mask(zscore_mask)
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample: must be one of {', '.join(RESAMPLE_MODES)}, got {resample!r}")
        o = _as_ornt(orientation)
        shape = tuple(int(s) for s in original_shape[:3])
        ras_shape = tuple(shape[int(np.flatnonzero(o[:, 0] == j)[0])] for j in range(3))
        grid = tuple(int(s) for s in volume_shape)
        spacing_target: tuple[float, float, float] | None = None
        if resample == "none":
            resampled = ras_shape
        elif resample == "resize":
            resampled = grid
        else:
            if target_spacing is None or len(target_spacing) != 3 or not all(
                    math.isfinite(float(s)) and float(s) > 0 for s in target_spacing):
                raise ValueError(f"target_spacing: need three positive spacings in mm for resample 'spacing', "
                                 f"got {None if target_spacing is None else list(target_spacing)}")
            tx, ty, tz = (float(s) for s in target_spacing)
            spacing_target = (tx, ty, tz)
            zooms = np.asarray(voxel_spacing(original_affine))
            ras_zooms = [float(zooms[int(np.flatnonzero(o[:, 0] == j)[0])]) for j in range(3)]
            resampled = tuple(max(1, int(round(n * z / t))) for n, z, t in zip(ras_shape, ras_zooms, (tx, ty, tz)))
        voxels = math.prod(resampled)
        if voxels > max_voxels:
            raise ValueError(f"resample: the resampled grid {'x'.join(map(str, resampled))} ({voxels:.3g} voxels) "
                             f"exceeds the limit of {max_voxels:.3g}; choose a coarser target spacing")
        return cls(
            original_shape=shape,  # type: ignore[arg-type]
            original_affine=_tuple2(original_affine),
            orientation=tuple((int(a), int(f)) for a, f in o),
            volume_shape=grid,  # type: ignore[arg-type]
            box=crop_pad_box(resampled, grid),
            zscore_mask=zscore_mask,
            resample=resample,
            resampled_shape=resampled,  # type: ignore[arg-type]
            target_spacing=spacing_target,
        )

    def with_stats(self, means: Sequence[float], stds: Sequence[float]) -> "PreprocessRecord":
        return replace(self, means=tuple(float(m) for m in means), stds=tuple(float(s) for s in stds))

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        """Spatial shape after reorientation, before resampling and crop/pad."""
        o = np.asarray(self.orientation)
        return tuple(self.original_shape[int(np.flatnonzero(o[:, 0] == j)[0])] for j in range(3))  # type: ignore[return-value]

    @property
    def resampled(self) -> tuple[int, int, int]:
        """Spatial shape after resampling (the RAS shape when nothing is resampled)."""
        return self.resampled_shape if self.resampled_shape is not None else self.ras_shape

    @property
    def ras_affine(self) -> np.ndarray:
        """RAS voxel -> world affine (4x4), as ``nibabel.as_closest_canonical`` gives."""
        return np.asarray(self.original_affine) @ orientation_affine(self.orientation, self.original_shape)

    @property
    def grid_affine(self) -> np.ndarray:
        """Model-grid voxel -> world affine (4x4): the RAS affine, resampled, shifted by the crop/pad."""
        shift = np.eye(4)
        shift[:3, 3] = [b[0] - b[2] for b in self.box]
        return self.ras_affine @ _resample_matrix(self.ras_shape, self.resampled) @ shift

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the model-grid axes (after resampling)."""
        zooms = np.sqrt((self.grid_affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) for z in zooms)  # type: ignore[return-value]

    @property
    def cropped(self) -> bool:
        """Whether crop/pad removed voxels (they cannot be restored)."""
        return any(b[1] - b[0] < n for b, n in zip(self.box, self.resampled))

    def to_grid(self, volume: Any, *, order: int = 1, fill: float = 0, dtype: Any = None) -> Any:
        """Source geometry ``(..., *original_shape)`` -> model grid ``(..., *volume_shape)``.

        Args:
            volume: NumPy (computed) or dask (lazy) array.
            order: 1 (linear: images) or 0 (nearest: labels) when resampling.
            fill: value of padded voxels.
            dtype: output dtype (default: the resampled dtype).
        """
        if tuple(volume.shape[-3:]) != self.original_shape:
            raise ValueError(f"to_grid: volume shape {tuple(volume.shape[-3:])} != original shape {self.original_shape}")
        out = resample(apply_orientation(volume, self.orientation), self.resampled, order)
        out = apply_box(out, self.box, self.volume_shape, fill)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def to_original(self, volume: Any, *, order: int, fill: float = 0) -> Any:
        """Model grid ``(..., *volume_shape)`` -> source geometry ``(..., *original_shape)``.

        Use it to write predictions in the source file's voxel grid (with ``original_affine``):
        probabilities with ``order=1`` (then threshold), masks and labels with ``order=0``.
        """
        if tuple(volume.shape[-3:]) != self.volume_shape:
            raise ValueError(f"to_original: volume shape {tuple(volume.shape[-3:])} != model grid {self.volume_shape}")
        out = undo_box(volume, self.box, self.resampled, fill)
        out = resample(out, self.ras_shape, order)
        return apply_orientation(out, invert_orientation(self.orientation))

    def to_original_planes(self, volume: np.ndarray, start: int, stop: int, *, order: int, fill: float = 0) -> np.ndarray:
        """Planes ``start:stop`` along the source's last axis of ``to_original(volume)``.

        Only the model-grid planes those source planes interpolate from are un-cropped and
        resampled, so a scan-sized output can be produced slab by slab from a grid-sized one.

        Args:
            volume: ``(..., *volume_shape)`` NumPy array on the model grid.
            start, stop: plane range along the source's last axis (``0 <= start < stop <= Z``).
            order: 1 (linear, float32 result) or 0 (nearest, dtype kept).
            fill: value of voxels the crop removed.

        Returns:
            ``(..., X, Y, stop - start)`` in the source's axis order.
        """
        volume = np.asarray(volume)
        if tuple(volume.shape[-3:]) != self.volume_shape:
            raise ValueError(f"to_original_planes: volume shape {tuple(volume.shape[-3:])} != model grid {self.volume_shape}")
        if not 0 <= start < stop <= self.original_shape[2]:
            raise ValueError(f"to_original_planes: planes {start}:{stop} outside 0:{self.original_shape[2]}")
        lead = volume.ndim - 3
        o = _as_ornt(self.orientation)
        axis, flip = int(o[2, 0]), int(o[2, 1])  # the RAS axis the source's last axis becomes
        planes = np.arange(start, stop)
        if flip == -1:
            planes = self.ras_shape[axis] - 1 - planes
        lo, hi, weight = interpolation_plan(self.resampled[axis], self.ras_shape[axis], order)
        lo, hi, weight = lo[planes], hi[planes], weight[planes]
        first, last = int(min(lo.min(), hi.min())), int(max(lo.max(), hi.max())) + 1
        # un-crop only resampled planes first:last along `axis` (the box maps resampled <-> grid planes)
        src0, src1, dst0, _ = self.box[axis]
        lo_r, hi_r = max(first, src0), min(last, src1)
        box = list(self.box)
        grid_planes = slice(0, 0)
        if hi_r > lo_r:
            grid_planes = slice(lo_r - src0 + dst0, hi_r - src0 + dst0)
            box[axis] = (lo_r - first, hi_r - first, 0, hi_r - lo_r)
        else:  # every needed plane was cropped away
            box[axis] = (0, 0, 0, 0)
        index = [slice(None)] * volume.ndim
        index[lead + axis] = grid_planes
        sub_shape = list(self.resampled)
        sub_shape[axis] = last - first
        out = undo_box(volume[tuple(index)], tuple(box), sub_shape, fill)  # type: ignore[arg-type]
        a = np.take(out, lo - first, axis=lead + axis)
        if order == 1:
            a = a.astype(np.float32, copy=False)
            b = np.take(out, hi - first, axis=lead + axis).astype(np.float32, copy=False)
            a = a + (b - a) * weight.reshape((-1,) + (1,) * (2 - axis))
        for other in range(3):
            if other != axis:
                a = resample_axis(a, lead + other, self.ras_shape[other], order)
        inverse = invert_orientation(self.orientation)
        inverse[axis, 1] = 1  # the planes are already in source order
        return np.ascontiguousarray(apply_orientation(a, inverse))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (lists, floats, ints)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": [list(r) for r in self.original_affine],
            "orientation": [list(r) for r in self.orientation],
            "volume_shape": list(self.volume_shape),
            "box": [list(b) for b in self.box],
            "zscore_mask": self.zscore_mask,
            "means": list(self.means),
            "stds": list(self.stds),
            "label_map": self.label_map,
            "resample": self.resample,
            "resampled_shape": list(self.resampled),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessRecord":
        """Inverse of ``to_dict`` (records written before resampling existed read as ``"none"``);
        raises ``ValueError`` naming a missing or malformed field."""
        try:
            spacing = data.get("target_spacing")
            resampled = data.get("resampled_shape")
            record = cls(
                original_shape=tuple(int(v) for v in data["original_shape"]),  # type: ignore[arg-type]
                original_affine=_tuple2(data["original_affine"]),
                orientation=tuple((int(a), int(f)) for a, f in data["orientation"]),
                volume_shape=tuple(int(v) for v in data["volume_shape"]),  # type: ignore[arg-type]
                box=cast(Box, tuple(tuple(int(v) for v in b) for b in data["box"])),
                zscore_mask=str(data.get("zscore_mask", "nonzero")),
                means=tuple(float(v) for v in data.get("means", ())),
                stds=tuple(float(v) for v in data.get("stds", ())),
                label_map=str(data.get("label_map", "nonzero")),
                resample=str(data.get("resample", "none")),
                resampled_shape=None if resampled is None else tuple(int(v) for v in resampled),  # type: ignore[arg-type]
                target_spacing=None if spacing is None else tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"preprocess record: malformed ({type(exc).__name__}: {exc})") from exc
        if record.resample not in RESAMPLE_MODES:
            raise ValueError(f"preprocess record: unknown resample mode {record.resample!r}")
        return record


__all__ = [
    "Box",
    "MAX_GRID_VOXELS",
    "PreprocessRecord",
    "RESAMPLE_MODES",
    "ZSCORE_MASKS",
    "apply_box",
    "check_zscore_mask",
    "apply_orientation",
    "crop_or_pad",
    "crop_pad_box",
    "interpolation_plan",
    "invert_orientation",
    "orientation_affine",
    "resample",
    "resample_axis",
    "undo_box",
    "undo_crop_or_pad",
    "voxel_spacing",
]
