"""ossnet.geometry: reorient, resample and crop/pad a scan onto the model grid, and back."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from ossnet.geometry import (
    PreprocessRecord,
    interpolation_plan,
    resample,
    resample_axis,
    voxel_spacing,
)
from ossnet.metrics import dice


def _affine(spacing, axes=(0, 1, 2), flips=(1, 1, 1)) -> np.ndarray:
    """Voxel axis i runs along world axis axes[i] with sign flips[i] (a permuted/flipped scan)."""
    a = np.zeros((4, 4))
    for i, (w, f) in enumerate(zip(axes, flips)):
        a[w, i] = f * spacing[i]
    a[3, 3] = 1.0
    a[:3, 3] = [-10.0, 20.0, 5.0]
    return a


def _orientation(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.io_orientation(affine)


def _ellipsoid(shape, affine, centre_mm, radii_mm) -> np.ndarray:
    """A label defined in world coordinates: the same anatomy whatever the voxel grid."""
    idx = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    q = (((world - centre_mm) / radii_mm) ** 2).sum(axis=1)
    return (q <= 1.0).reshape(shape).astype(np.uint8)


def _round_trip(record: PreprocessRecord, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A perfect predictor on the grid, mapped back: (nearest-neighbour mask, thresholded probability)."""
    grid = record.to_grid(label, order=0)
    assert grid.shape == record.volume_shape and grid.dtype == np.uint8
    nearest = np.asarray(record.to_original(grid, order=0))
    probability = np.asarray(record.to_original(grid.astype(np.float32), order=1))
    return nearest, probability >= 0.5


def test_interpolation_maps_voxel_centres() -> None:
    lo, hi, w = interpolation_plan(4, 8, 1)  # upsampling x2: centres at -0.25, 0.25, 0.75, ...
    np.testing.assert_array_equal(lo, [0, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_allclose(w, [0, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0])
    lo0, hi0, _ = interpolation_plan(8, 4, 0)  # downsampling x2: nearest picks 1, 3, 5, 7
    np.testing.assert_array_equal(lo0, [1, 3, 5, 7])
    ramp = np.arange(10, dtype=np.float32)[None, :, None]
    out = resample_axis(ramp, 1, 5, 1)  # a linear ramp stays linear: means of voxel pairs
    np.testing.assert_allclose(out[0, :, 0], [0.5, 2.5, 4.5, 6.5, 8.5])
    same = np.ones((3, 4, 5), np.uint8)
    assert resample_axis(same, 2, 5, 1) is same  # an unchanged axis is never touched
    with pytest.raises(ValueError, match="order"):
        interpolation_plan(3, 4, 3)


@pytest.mark.parametrize("name, axes, flips", [
    ("RAS", (0, 1, 2), (1, 1, 1)),
    ("LAS", (0, 1, 2), (-1, 1, 1)),
    ("LPS", (0, 1, 2), (-1, -1, 1)),
    ("permuted", (2, 0, 1), (1, -1, 1)),
])
@pytest.mark.parametrize("mode", ["none", "resize", "spacing"])
def test_perfect_predictor_round_trip(name: str, axes, flips, mode: str) -> None:
    shape, spacing = (40, 34, 30), (1.2, 1.0, 1.5)
    affine = _affine(spacing, axes, flips)
    label = _ellipsoid(shape, affine, affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3], (14.0, 11.0, 12.0))
    grid = (44, 40, 48)  # larger than every axis: nothing is cropped
    record = PreprocessRecord.create(shape, affine, _orientation(affine), grid, resample=mode,
                                     target_spacing=(1.0, 1.0, 1.0) if mode == "spacing" else None)
    nearest, thresholded = _round_trip(record, label)
    for mask in (nearest, thresholded):
        assert mask.shape == shape
        assert dice(mask, label) >= 0.99, (name, mode, dice(mask, label))
    if mode == "none":  # no resampling and no cropping: exact
        np.testing.assert_array_equal(nearest, label)
        np.testing.assert_array_equal(thresholded, label)
    # The grid affine puts the anatomy where the source affine does (centroids within a voxel).
    grid_label = record.to_grid(label, order=0)
    centroid_grid = record.grid_affine @ np.append(np.argwhere(grid_label).mean(axis=0), 1.0)
    centroid_src = affine @ np.append(np.argwhere(label).mean(axis=0), 1.0)
    assert np.abs(centroid_grid - centroid_src).max() < 1.5


@pytest.mark.parametrize("target", [(0.7, 0.7, 0.7), (1.0, 1.0, 1.0)])
def test_anisotropic_scan_resampled_to_a_target_spacing(target) -> None:
    # 0.7 x 0.7 x 5 mm slices. At 0.7 mm isotropic the slices are replicated and the round trip
    # is exact; at 1 mm the grid is coarser in-plane and detail below 1 mm is lost, so the
    # structure is organ-sized (a 14 mm lesion keeps Dice 0.976-0.982 there).
    shape, spacing = (128, 128, 24), (0.7, 0.7, 5.0)
    affine = _affine(spacing)
    label = _ellipsoid(shape, affine, affine[:3, 3] + [45.0, 45.0, 60.0], (35.0, 33.0, 45.0))
    grid = (92, 92, 122) if target[0] == 1.0 else (128, 128, 172)
    record = PreprocessRecord.create(shape, affine, _orientation(affine), grid, resample="spacing",
                                     target_spacing=target)
    expected = tuple(int(round(n * z / t)) for n, z, t in zip(shape, spacing, target))
    assert record.resampled == expected and not record.cropped
    np.testing.assert_allclose(record.spacing, [n * z / m for n, z, m in zip(shape, spacing, expected)], rtol=1e-6)
    nearest, thresholded = _round_trip(record, label)
    assert dice(nearest, label) >= 0.99 and dice(thresholded, label) >= 0.99
    if target[0] == 0.7:
        np.testing.assert_array_equal(nearest, label)


def test_long_lits_like_scan_resized_as_in_the_paper() -> None:
    shape, spacing = (48, 48, 700), (0.8, 0.8, 0.7)
    affine = _affine(spacing)
    # The liver sits in the upper part of a long thorax-to-pelvis scan, as it often does.
    liver = _ellipsoid(shape, affine, affine[:3, 3] + [15.0, 20.0, 380.0], (12.0, 11.0, 100.0))
    record = PreprocessRecord.create(shape, affine, _orientation(affine), (48, 48, 512), resample="resize")
    assert record.box == ((0, 48, 0, 48), (0, 48, 0, 48), (0, 512, 0, 512)) and not record.cropped
    nearest, thresholded = _round_trip(record, liver)
    assert dice(nearest, liver) >= 0.99 and dice(thresholded, liver) >= 0.99
    # Centre-cropping the same scan instead loses liver outside the central 512 slices.
    cropped = PreprocessRecord.create(shape, affine, _orientation(affine), (48, 48, 512))
    assert cropped.cropped and dice(_round_trip(cropped, liver)[0], liver) < 0.9


def test_dask_and_numpy_give_the_same_grid() -> None:
    rng = np.random.default_rng(0)
    shape = (30, 26, 20)
    affine = _affine((1.0, 1.0, 2.5), (1, 0, 2), (-1, 1, 1))
    image = rng.normal(size=(2,) + shape).astype(np.float32)
    record = PreprocessRecord.create(shape, affine, _orientation(affine), (24, 32, 40), resample="spacing",
                                     target_spacing=(1.0, 1.0, 1.0))
    expected = record.to_grid(image)
    lazy = record.to_grid(da.from_array(image, chunks=(1, 30, 26, 4)))
    assert isinstance(lazy, da.Array) and lazy.shape == expected.shape
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-6, atol=1e-6)
    back = record.to_original(da.from_array(expected, chunks=(1, 8, 8, 8)), order=1)
    np.testing.assert_allclose(back.compute(), record.to_original(expected, order=1), rtol=1e-6, atol=1e-6)


def test_bad_geometry_is_refused_with_one_line_errors() -> None:
    good = _affine((1.0, 1.0, 1.0))
    sheared = good.copy()
    sheared[0, 1] = 0.3
    with pytest.raises(ValueError, match="sheared"):
        voxel_spacing(sheared, "scan.nii.gz")
    zero = good.copy()
    zero[:3, 2] = 0.0
    with pytest.raises(ValueError, match="scan.nii.gz: zero voxel spacing"):
        voxel_spacing(zero, "scan.nii.gz")
    nan = good.copy()
    nan[1, 1] = np.nan
    with pytest.raises(ValueError, match="not a finite"):
        voxel_spacing(nan, "scan.nii.gz")
    oblique = good.copy()
    c, s = np.cos(0.3), np.sin(0.3)
    oblique[:2, :2] = [[c, -s], [s, c]]
    assert voxel_spacing(oblique) == pytest.approx((1.0, 1.0, 1.0))  # rotations are fine
    with pytest.raises(ValueError, match="exceeds the limit"):
        PreprocessRecord.create((512, 512, 400), good, _orientation(good), (64, 64, 64), resample="spacing",
                                target_spacing=(0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessRecord.create((8, 8, 8), good, _orientation(good), (8, 8, 8), resample="spacing")
    with pytest.raises(ValueError, match="resample"):
        PreprocessRecord.create((8, 8, 8), good, _orientation(good), (8, 8, 8), resample="zoom")


def test_record_round_trips_through_json_and_reads_old_records() -> None:
    affine = _affine((0.8, 0.8, 3.0), (0, 1, 2), (-1, 1, 1))
    record = PreprocessRecord.create((50, 60, 20), affine, _orientation(affine), (40, 40, 40), "all",
                                     resample="spacing", target_spacing=(1.0, 1.0, 1.5)).with_stats([1.5], [2.0])
    again = PreprocessRecord.from_dict(record.to_dict())
    assert again == record and again.resampled == (40, 48, 40)
    old = {k: v for k, v in record.to_dict().items() if k not in ("resample", "resampled_shape", "target_spacing")}
    legacy = PreprocessRecord.from_dict(old)
    assert legacy.resample == "none" and legacy.resampled == legacy.ras_shape
    with pytest.raises(ValueError, match="resample mode"):
        PreprocessRecord.from_dict({**record.to_dict(), "resample": "zoom"})
    assert resample(np.zeros((2, 3, 4, 5)), (3, 4, 5), 1).shape == (2, 3, 4, 5)


@pytest.mark.parametrize("axes, flips", [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (-1, 1, -1)), ((1, 2, 0), (1, -1, -1))])
@pytest.mark.parametrize("mode, shape, grid", [
    ("none", (20, 17, 13), (16, 16, 16)),  # crops two axes, pads one
    ("resize", (40, 9, 23), (16, 12, 10)),
    ("spacing", (30, 25, 11), (14, 30, 16)),
])
def test_slabs_of_the_inverse_equal_the_whole_inverse(axes, flips, mode, shape, grid) -> None:
    affine = _affine((0.7, 0.9, 2.5), axes, flips)
    record = PreprocessRecord.create(shape, affine, _orientation(affine), grid, resample=mode,
                                     target_spacing=(1.0, 1.0, 1.0) if mode == "spacing" else None)
    probability = np.random.default_rng(1).random(grid).astype(np.float32)
    mask = (probability > 0.5).astype(np.uint8)
    for order, volume in ((1, probability), (0, mask)):
        whole = record.to_original(volume, order=order)
        for start, stop in ((0, shape[2]), (0, 1), (3, 7), (shape[2] - 2, shape[2])):
            part = record.to_original_planes(volume, start, stop, order=order)
            assert part.shape == whole[..., start:stop].shape and part.dtype == whole.dtype
            if order == 0:
                np.testing.assert_array_equal(part, whole[..., start:stop])
            else:
                np.testing.assert_allclose(part, whole[..., start:stop], atol=1e-6)
    with pytest.raises(ValueError, match="planes 5:5"):
        record.to_original_planes(probability, 5, 5, order=1)
