"""ossnet_pipelines.nifti and ossnet_pipelines.volumes: lazy slab reads, streamed writes, the chunked transform."""

from __future__ import annotations

import math
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

from ossnet.preprocess import zscore_channel
from ossnet_pipelines import nifti, volumes

AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 0.0, 1.6, -5.0], [0.0, 0.0, 0.0, 1.0]])


def _scan(shape=(23, 19, 17), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(300.0, 40.0, size=shape).astype(np.float32)
    x[:3] = 0.0
    return x


@pytest.mark.parametrize("name, in_memory_bytes, route", [
    ("s.nii", 0, "in place"), ("s.nii.gz", 1 << 30, "in memory"), ("s.nii.gz", 0, "temporary .nii"),
])
def test_lazy_slabs_read_exactly_what_nibabel_reads(tmp_path: Path, name: str, in_memory_bytes: int, route: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nifti, "SLAB_BYTES", 23 * 19 * 4 * 3)  # three planes per slab
    monkeypatch.setattr(nifti, "IN_MEMORY_BYTES", in_memory_bytes)
    scan = _scan()
    path = str(tmp_path / name)
    nib.save(nib.Nifti1Image(scan, AFFINE), path)
    with nifti.seekable(path, path) as readable:
        # A .nii is read in place; a large .nii.gz is decompressed once to a temporary .nii.
        assert (readable == path) == (route != "temporary .nii") and readable.endswith(".nii" if route != "in memory" else ".gz")
        img = nifti.load(readable, path)
        lazy = nifti.lazy_volume(img, path)
        assert isinstance(lazy, da.Array) and lazy.chunks[2] == (3, 3, 3, 3, 3, 2)
        np.testing.assert_array_equal(lazy.compute(), scan)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the temporary copy is gone


def test_scaled_labels_keep_their_fractions(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4), AFFINE)
    img.header.set_slope_inter(0.5, 0.0)
    nib.save(img, str(tmp_path / "l.nii"))
    lazy = nifti.lazy_volume(nifti.load(str(tmp_path / "l.nii")), "l.nii", dtype=None)
    assert lazy.dtype == np.float64 and lazy.compute()[0, 0, 1] == 0.5


def test_truncated_files_fail_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(_scan(), AFFINE), str(path))
    path.write_bytes(path.read_bytes()[:-2000])
    img = nifti.load(str(path))
    with pytest.raises(nifti.NiftiError, match="cut.nii.gz: cannot read voxel data"):
        nifti.lazy_volume(img, str(path)).compute()


@pytest.mark.parametrize("mask", ["nonzero", "all"])
def test_chunked_z_score_matches_the_in_memory_one(mask: str) -> None:
    scan = _scan(seed=1)
    expected, mean, std = zscore_channel(scan, mask)
    got_mean, got_std, n_nan, n_inf, constant = volumes.zscore_moments(da.from_array(scan, chunks=(23, 19, 4)), mask)
    assert (n_nan, n_inf, constant) == (0, 0, False)
    assert got_mean == pytest.approx(mean, rel=1e-9) and got_std == pytest.approx(std, rel=1e-6)
    normed = volumes.normalise(da.from_array(scan, chunks=(23, 19, 4)), got_mean, got_std, mask).compute()
    np.testing.assert_allclose(normed, expected, rtol=1e-5, atol=1e-5)
    bad = scan.copy()
    bad[5, 5, 5], bad[6, 6, 6] = np.nan, np.inf
    assert volumes.zscore_moments(da.from_array(bad, chunks=(23, 19, 4)), mask)[2:4] == (1, 1)
    flat = np.full_like(scan, 7.0)
    assert volumes.zscore_moments(da.from_array(flat, chunks=(23, 19, 4)), mask).constant


def test_store_grid_writes_every_shard_once(tmp_path: Path) -> None:
    import zarr

    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 40, 36, 20), dtype=np.float16,
                              chunks=(1, 8, 8, 8), shards=(1, 16, 16, 16))
    data = np.random.default_rng(0).normal(size=(40, 36, 20)).astype(np.float32) * 1e5  # beyond float16
    for c in range(2):
        volumes.store_grid(da.from_array(data + c, chunks=(40, 36, 3)), array, lead=(c,))
    limit = np.finfo(np.float16).max
    np.testing.assert_array_equal(array[1], np.clip(data + 1, -limit, limit).astype(np.float16))


def test_scan_view_is_one_task_per_slab_of_a_large_scan() -> None:
    """A 64^3 prediction mapped onto a 1024x1024x600 scan: a graph of slabs, not of voxels."""
    from ossnet.geometry import PreprocessRecord

    shape = (1024, 1024, 600)
    record = PreprocessRecord.create(shape, np.eye(4), np.array([[0, 1], [1, 1], [2, 1]]), (64, 64, 64), "all",
                                     resample="resize")
    probability = np.zeros((64, 64, 64), dtype=np.float32)
    probability[20:40, 20:40, 20:40] = 1.0
    mask = volumes.scan_mask(probability, record, 0.5)
    step = nifti.slab_chunks(shape, 4)[2]
    assert mask.shape == shape and mask.chunks[2][0] == step and len(mask.chunks[0]) == 1
    assert len(dict(mask.sum().__dask_graph__())) < 10 * math.ceil(shape[2] / step)
    planes = mask[:, :, 300:308].compute()  # the slab through the cube's centre
    np.testing.assert_array_equal(planes[:, :, 0].any(axis=1).nonzero()[0][[0, -1]], [320, 639])
