"""The one executor of the scan <-> model-grid transform: lazy, chunked dask graphs over NIfTI files.

``ossnet.geometry.PreprocessRecord`` says what happens to a case (reorient, resample, crop/pad,
z-score); this module runs it without holding a scan in memory, for every stage that turns
scans into model grids or predictions back into scans (ingest, batch inference, benchmarks):

* ``image_grid``: per channel, a dask array of file slabs (``ossnet_pipelines.nifti.lazy_volume``);
  one pass computes the z-score statistics and the finite check as dask reductions; the
  normalised channel then goes through the record's transform, still lazily;
* ``label_grid``: one pass finds the label's distinct values (then checked) and binarises and
  resamples it by nearest neighbour onto the grid;
* ``store_grid``: writes a lazy grid into a Zarr array, rechunked to its shards so that no two
  tasks write one shard;
* ``scan_view``: a grid-sized prediction lazily mapped back onto the scan (linear for
  probabilities, nearest for masks), for ``ossnet_pipelines.nifti.write_volume`` to stream slab by slab.

Peak memory is a few slabs per worker thread, whatever the scan's size. Scheduling: dask's
threaded scheduler with ``workers`` threads (``compute_options``); ``scheduler="ray"`` runs the
same graphs on the Ray cluster (``ray.util.dask``), for one scan too large for one node's
cores.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from ossnet.geometry import PreprocessRecord, apply_orientation, resample
from ossnet.preprocess import validate_label_values

logger = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ("threads", "ray")


@contextlib.contextmanager
def compute_options(scheduler: str = "threads", workers: int = 1) -> Iterator[None]:
    """Run dask computations inside the block on ``scheduler`` ("threads" or "ray")."""
    import dask

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler == "ray":
        from ray.util.dask import ray_dask_get

        with dask.config.set(scheduler=ray_dask_get):
            yield
        return
    with dask.config.set(scheduler="threads", num_workers=max(1, int(workers))):
        yield


def _block_moments(block: np.ndarray, mask: str) -> np.ndarray:
    """``[[count, sum, sum of squares, NaN count, Inf count]]`` of one block, in float64, plane by
    plane (no float64 copy of the block)."""
    out = np.zeros(5, dtype=np.float64)
    for plane in np.moveaxis(block, -1, 0):
        finite = np.isfinite(plane)
        out[3] += np.count_nonzero(np.isnan(plane))
        out[4] += plane.size - np.count_nonzero(finite) - np.count_nonzero(np.isnan(plane))
        keep = finite & (plane != 0) if mask == "nonzero" else finite
        values = plane[keep].astype(np.float64)
        out[0] += values.size
        out[1] += values.sum()
        out[2] += np.einsum("i,i->", values, values)  # not np.dot: idle BLAS threads spin on the other workers' cores
    return out.reshape((1,) * block.ndim + (5,))


class Moments(NamedTuple):
    """What one pass over a channel found: the z-score statistics, the non-finite voxel counts,
    and whether the channel is constant over its mask (then ``std`` is 1 and it z-scores to 0)."""

    mean: float
    std: float
    n_nan: int
    n_inf: int
    constant: bool = False


def zscore_moments(channel: Any, mask: str) -> Moments:
    """Mean and std of a lazy channel, and its NaN and Inf counts, from one pass over it.

    Each block is reduced to five numbers as soon as it is read, so the pass holds about one
    slab per thread. The mask follows ``ossnet.preprocess.zscore_stats``: ``"nonzero"`` voxels or
    ``"all"``; an empty mask gives (0, 1) and a constant channel std 1 (``Moments.constant``).
    """
    import dask.array as da

    parts = da.map_blocks(_block_moments, channel, mask, dtype=np.float64, new_axis=channel.ndim,
                          chunks=tuple((1,) * len(c) for c in channel.chunks) + ((5,),))
    count, total, squares, n_nan, n_inf = parts.reshape(-1, 5).sum(axis=0).compute()
    if count == 0:
        return Moments(0.0, 1.0, int(n_nan), int(n_inf), constant=True)
    mean = float(total) / float(count)
    std = math.sqrt(max(float(squares) / float(count) - mean * mean, 0.0))
    # Relative: one-pass variance leaves rounding noise of about 1e-8 * |mean| on a constant channel.
    if not math.isfinite(std) or std < 1e-6 * max(1.0, abs(mean)):
        return Moments(mean, 1.0, int(n_nan), int(n_inf), constant=True)
    return Moments(mean, std, int(n_nan), int(n_inf))


def normalise(channel: Any, mean: float, std: float, mask: str) -> Any:
    """Lazily z-score a channel; with ``"nonzero"`` the zero background stays 0. float32."""
    normed = ((channel - np.float32(mean)) / np.float32(std)).astype(np.float32)
    return np.where(channel != 0, normed, np.float32(0)) if mask == "nonzero" else normed


def image_grid(channels: Sequence[tuple[Any, str]], record: PreprocessRecord,
               warnings: list[str] | None = None) -> tuple[Any, PreprocessRecord]:
    """The case's model-grid image as a lazy ``(C, *volume_shape)`` float32 dask array.

    A constant channel (or one whose z-score mask is empty) is z-scored to zeros: that is
    logged, naming the file, and appended to ``warnings`` when given.

    Args:
        channels: ``(lazy (X, Y, Z) channel, file name)`` per modality (``nifti.lazy_volume``).
        record: the case geometry (``PreprocessRecord.create``).
        warnings: collects one line per constant channel.

    Returns:
        ``(lazy grid, record with the z-score statistics)``.

    Raises:
        ValueError: a channel with NaN or Inf, naming its file.
    """
    import dask.array as da

    grids, means, stds = [], [], []
    for channel, name in channels:
        mean, std, n_nan, n_inf, constant = zscore_moments(channel, record.zscore_mask)
        if n_nan or n_inf:
            raise ValueError(f"{name}: non-finite voxels (NaN: {n_nan}, Inf: {n_inf})")
        if constant:
            message = (f"{name}: constant image (value {mean:g} over its {record.zscore_mask} z-score mask); "
                       "it carries no information and z-scores to zeros")
            logger.warning("%s", message)
            if warnings is not None:
                warnings.append(message)
        grids.append(record.to_grid(normalise(channel, mean, std, record.zscore_mask), order=1, dtype=np.float32))
        means.append(mean)
        stds.append(std)
    return da.stack(grids), record.with_stats(means, stds)


def _block_values(block: np.ndarray) -> np.ndarray:
    """The distinct values of one block (a bincount for small non-negative integers: no sort)."""
    if block.dtype.kind in "ui" and block.size:
        lo, hi = int(block.min()), int(block.max())
        if lo >= 0 and hi < 1 << 16:
            return np.flatnonzero(np.bincount(block.ravel(), minlength=1))
    return np.unique(block)


def label_grid(label: Any, record: PreprocessRecord, allowed: Sequence[int], name: str,
               keep_values: bool = False) -> tuple[np.ndarray, int]:
    """Check a lazy label, binarise it (label > 0) or keep its values, and bring it onto the grid.

    One pass reads the label: it yields the distinct values (checked afterwards, as
    ``ossnet.preprocess.validate_label_values`` does), the grid and the foreground before crop/pad.

    Args:
        keep_values: keep the source's label values (multi-target stores, nearest neighbour
            resampling), instead of 0/1.

    Returns:
        ``(grid uint8 (X', Y', Z'), foreground voxels lost to cropping)``: the loss is counted
        on the resampled grid, before crop/pad.

    Raises:
        ValueError: unexpected, non-integer or non-finite values, naming ``name``.
    """
    import dask

    values = [dask.delayed(_block_values)(block) for block in label.to_delayed().ravel()]
    binary = (label > 0).astype(np.uint8)
    stored = label.astype(np.uint8) if keep_values else binary
    before = resample(apply_orientation(binary, record.orientation), record.resampled, 0).sum()
    found, grid, total = dask.compute(values, record.to_grid(stored, order=0, dtype=np.uint8), before)
    validate_label_values(np.unique(np.concatenate(found)), allowed, name)
    grid = np.ascontiguousarray(grid)
    return grid, int(total) - int(np.count_nonzero(grid))


def store_grid(volume: Any, array: Any, lead: Sequence[int] = ()) -> None:
    """Write a lazy grid into ``array[lead]`` (a Zarr array), one shard per task.

    Float16 targets get the volume clipped to the float16 range first (as ``CaseWriter.write``).
    """
    import dask.array as da

    shards = tuple(array.shards or array.chunks)[len(lead):]
    target = array.dtype
    if target == np.float16:
        limit = np.finfo(np.float16).max
        volume = np.clip(volume, -limit, limit)
    volume = volume.astype(target).rechunk(shards)
    region = tuple(slice(i, i + 1) for i in lead) + tuple(slice(0, s) for s in volume.shape)
    da.store(volume.reshape((1,) * len(lead) + volume.shape), array, regions=region, lock=False)


def scan_view(grid: np.ndarray, record: PreprocessRecord, order: int) -> Any:
    """A grid-sized prediction lazily mapped back onto the scan's voxel grid.

    One task per slab of whole scan planes (``ossnet_pipelines.nifti.slab_chunks`` of float32, the
    writer's own slabs), each computed from the few grid planes it interpolates from
    (``PreprocessRecord.to_original_planes``): the graph has a task per slab whatever the
    scan's size, and computing a slab holds that slab and the grid, never the scan.

    Args:
        grid: ``(X', Y', Z')`` on the model grid (a probability for ``order=1``, a mask for 0).
        record: the case geometry.
        order: 1 (linear: probabilities, threshold afterwards) or 0 (nearest: masks, labels).

    Returns:
        A lazy ``(*original_shape)`` dask array, chunked in z-slabs.
    """
    import uuid

    import dask
    import dask.array as da

    from ossnet_pipelines.nifti import slab_chunks

    grid = np.asarray(grid)
    shape = tuple(int(s) for s in record.original_shape)
    dtype = np.dtype(np.float32) if order == 1 else grid.dtype
    step = slab_chunks(shape, 4)[2]
    source = dask.delayed(grid, name=f"grid-{uuid.uuid4().hex[:12]}")  # one graph key, not one copy per task
    planes = dask.delayed(record.to_original_planes, pure=False)
    slabs = [da.from_delayed(planes(source, z, min(z + step, shape[2]), order=order),
                             shape=shape[:2] + (min(z + step, shape[2]) - z,), dtype=dtype)
             for z in range(0, shape[2], step)]
    return da.concatenate(slabs, axis=2)


def scan_mask(probability: np.ndarray, record: PreprocessRecord, threshold: float) -> Any:
    """The scan-geometry mask of a grid probability: resampled linearly, then thresholded
    (``>= threshold``; voxels cropped away are background). Lazy uint8 ``(*original_shape)``."""
    return (scan_view(np.asarray(probability, dtype=np.float32), record, order=1) >= np.float32(threshold)).astype(np.uint8)


def mask_counts(pred: Any, ref: Any) -> Any:
    """``ossnet.metrics.ConfusionCounts`` of two (lazy or computed) masks, chunk by chunk."""
    return mask_counts_many([(pred, ref)])[0]


def mask_counts_many(pairs: Sequence[tuple[Any, Any]]) -> list[Any]:
    """``mask_counts`` of several ``(pred, ref)`` pairs in one pass: masks derived from the same
    lazy volumes (the regions of one label map) read those volumes once."""
    import dask
    import dask.array as da

    from ossnet.metrics import ConfusionCounts

    sums = []
    for pred, ref in pairs:
        p, r = da.asarray(pred) != 0, da.asarray(ref) != 0
        sums.append(((p & r).sum(), p.sum(), r.sum(), int(np.prod(p.shape, dtype=np.int64))))
    out = []
    for tp, n_pred, n_ref, total in dask.compute(sums)[0]:
        out.append(ConfusionCounts(tp=int(tp), fp=int(n_pred - tp), fn=int(n_ref - tp),
                                   tn=total - int(n_pred + n_ref - tp)))
    return out


def case_record(shape: Sequence[int], affine: Any, volume_shape: Sequence[int], zscore_mask: str,
                resample: str = "none", target_spacing: Sequence[float] | None = None, name: str = "") -> PreprocessRecord:
    """``PreprocessRecord.create`` for a scan's header; errors are prefixed with the file ``name``."""
    import nibabel as nib

    try:
        return PreprocessRecord.create(shape, affine, nib.io_orientation(np.asarray(affine)), volume_shape,
                                       zscore_mask, resample=resample, target_spacing=target_spacing)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}" if name else str(exc)) from None


__all__ = [
    "SCHEDULERS",
    "case_record",
    "compute_options",
    "image_grid",
    "label_grid",
    "mask_counts",
    "normalise",
    "scan_mask",
    "scan_view",
    "store_grid",
    "mask_counts_many",
    "zscore_moments",
]
