"""ossnet.preprocess: validation, z-score, orientation and crop/pad, all reversible."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from ossnet import preprocess as pp
from ossnet.preprocess import PreprocessRecord

# A non-identity affine: axes permuted and flipped, anisotropic spacing, offset origin.
AFFINE = np.array([[0.0, 0.0, -1.2, 80.0], [-0.9, 0.0, 0.0, 60.0], [0.0, 1.1, 0.0, -40.0], [0.0, 0.0, 0.0, 1.0]])


def _all_ornts() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            out.append(np.array([[p, f] for p, f in zip(perm, flips)]))
    return out


# ----------------------------------------------------------------------------- crop / pad


def test_crop_or_pad_is_centred_and_exact_on_odd_sizes() -> None:
    vol = np.arange(37 * 41 * 29, dtype=np.int32).reshape(37, 41, 29)
    out, box = pp.crop_or_pad(vol, (32, 48, 29), fill=-1)
    assert out.shape == (32, 48, 29)
    # x: 37 -> 32 crops floor(5/2) = 2 before; y: 41 -> 48 pads ceil(7/2) = 4 before; z unchanged.
    assert box == ((2, 34, 0, 32), (0, 41, 4, 45), (0, 29, 0, 29))
    np.testing.assert_array_equal(out[:, 4:45, :], vol[2:34])
    assert (out[:, :4] == -1).all() and (out[:, 45:] == -1).all()


def test_crop_or_pad_matches_reference_padding_for_brats() -> None:
    # The reference loader pads 240x240x155 to 256x256x160 with ceil(d/2) before.
    box = pp.crop_pad_box((240, 240, 155), (256, 256, 160))
    assert [b[2] for b in box] == [8, 8, 3]


def test_undo_crop_or_pad_restores_uncropped_voxels_with_channels() -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, 37, 41, 29)).astype(np.float32)
    out, box = pp.crop_or_pad(vol, (40, 33, 31))
    back = pp.undo_crop_or_pad(out, vol.shape[-3:], box)
    assert back.shape == vol.shape
    # x and z were padded (fully restored); y was cropped 41 -> 33: 4 voxels lost before, 4 after.
    np.testing.assert_array_equal(back[:, :, 4:37], vol[:, :, 4:37])
    assert (back[:, :, :4] == 0).all() and (back[:, :, 37:] == 0).all()


def test_crop_or_pad_casts_while_copying() -> None:
    vol = np.ones((5, 6, 7), dtype=np.int16)
    out, _ = pp.crop_or_pad(vol, (4, 8, 7), dtype=np.float32)
    assert out.dtype == np.float32 and out.sum() == 4 * 6 * 7


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("ornt", _all_ornts()[::5])
def test_orientation_matches_nibabel_and_inverts(ornt: np.ndarray) -> None:
    vol = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    ours = pp.apply_orientation(vol, ornt)
    np.testing.assert_array_equal(ours, nib.orientations.apply_orientation(vol, ornt))
    np.testing.assert_allclose(pp.orientation_affine(ornt, vol.shape), nib.orientations.inv_ornt_aff(ornt, vol.shape))
    np.testing.assert_array_equal(pp.apply_orientation(ours, pp.invert_orientation(ornt)), vol)
    # Leading channel axes are left alone.
    stacked = np.stack([vol, vol + 1])
    np.testing.assert_array_equal(pp.apply_orientation(stacked, ornt)[1], ours + 1)


def test_orientation_rejects_non_permutation() -> None:
    with pytest.raises(ValueError, match="permutation"):
        pp.apply_orientation(np.zeros((2, 2, 2)), [[0, 1], [0, 1], [2, 1]])


# ----------------------------------------------------------------------------- z-score


def test_zscore_nonzero_mask_uses_foreground_only_and_keeps_background_zero() -> None:
    rng = np.random.default_rng(1)
    x = np.zeros((37, 41, 29), dtype=np.float32)
    x[5:30, 6:35, 4:25] = rng.normal(100.0, 15.0, size=(25, 29, 21))
    out, mean, std = pp.zscore_channel(x, "nonzero")
    fg = x != 0
    assert mean == pytest.approx(float(x[fg].astype(np.float64).mean()), rel=1e-9)
    assert std == pytest.approx(float(x[fg].astype(np.float64).std()), rel=1e-9)
    assert (out[~fg] == 0).all()
    assert abs(float(out[fg].mean())) < 1e-4 and float(out[fg].std()) == pytest.approx(1.0, abs=1e-4)
    back = pp.invert_zscore(out[None], [mean], [std], "nonzero")[0]
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-3)


def test_zscore_all_mask_and_slabs_agree_with_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pp, "_SLAB_ELEMENTS", 41 * 29 * 3)  # force many slabs of 3 planes
    rng = np.random.default_rng(2)
    x = rng.normal(-500.0, 300.0, size=(37, 41, 29)).astype(np.float32)
    out, mean, std = pp.zscore_channel(x.copy(), "all")
    assert mean == pytest.approx(float(x.astype(np.float64).mean()), rel=1e-9)
    assert std == pytest.approx(float(x.astype(np.float64).std()), rel=1e-9)
    np.testing.assert_allclose(out, (x - mean) / std, rtol=1e-5, atol=1e-5)


def test_zscore_inplace_overwrites_float32_input() -> None:
    x = np.arange(1, 2 * 3 * 4 + 1, dtype=np.float32).reshape(2, 3, 4)
    out, _, _ = pp.zscore_channel(x, "all", inplace=True)
    assert out is x and abs(float(x.mean())) < 1e-6


def test_zscore_constant_or_empty_channel_does_not_divide_by_zero() -> None:
    image = np.stack([np.full((4, 5, 6), 7.0), np.zeros((4, 5, 6))]).astype(np.float32)
    out, means, stds = pp.zscore_channels(image)
    assert np.isfinite(out).all()
    assert means == (7.0, 0.0) and stds == (1.0, 1.0)


def test_zscore_channels_with_explicit_mask() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 9, 8, 7)).astype(np.float32)
    mask = np.zeros((9, 8, 7), dtype=bool)
    mask[2:7, 1:6, 1:5] = True
    out, means, stds = pp.zscore_channels(image, mask)
    assert (out[:, ~mask] == 0).all()
    np.testing.assert_allclose(out[0][mask], (image[0][mask] - means[0]) / stds[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- validation


def test_validate_spatial_shape() -> None:
    assert pp.validate_spatial_shape((37, 41, 29, 1)) == (37, 41, 29)
    with pytest.raises(ValueError, match="a.nii: expected a 3D volume, got a 2D image"):
        pp.validate_spatial_shape((37, 41), "a.nii")
    with pytest.raises(ValueError, match="got a 4D image"):
        pp.validate_spatial_shape((37, 41, 29, 3), "a.nii")
    with pytest.raises(ValueError, match="axis of size < 2"):
        pp.validate_spatial_shape((37, 41, 1), "a.nii")


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN: 1"), (np.inf, "Inf: 1")])
def test_validate_finite_names_the_file(bad: float, kind: str) -> None:
    x = np.zeros((7, 8, 9), dtype=np.float32)
    x[3, 4, 5] = bad
    with pytest.raises(ValueError, match=f"img.nii.gz: non-finite voxels .*{kind}"):
        pp.validate_volume(x, "img.nii.gz")
    pp.validate_finite(np.zeros((3, 3, 3), dtype=np.int16))  # integers are always finite


def test_label_validation() -> None:
    label = np.zeros((6, 7, 8), dtype=np.float32)
    label[1, 2, 3], label[2, 2, 2] = 1, 4
    assert pp.validate_label_values(label, (0, 1, 2, 4)) == {0, 1, 4}
    label[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="seg.nii: non-integer label values, e.g. 0.5"):
        pp.validate_label_values(label, (0, 1, 2, 4), "seg.nii")
    ints = np.zeros((6, 7, 8), dtype=np.int16)
    ints[0, 0, 0], ints[1, 1, 1] = 3, -2
    with pytest.raises(ValueError, match=r"unexpected label values \[-2, 3\] \(allowed: 0, 1, 2, 4\)"):
        pp.validate_label_values(ints, (0, 1, 2, 4), "seg.nii")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pp.label_values(np.full((2, 2, 2), np.nan), "seg.nii")


def test_binarize_label() -> None:
    label = np.array([0, 1, 2, 4, 0], dtype=np.int16).reshape(1, 1, 5)
    np.testing.assert_array_equal(pp.binarize_label(label), [[[0, 1, 1, 1, 0]]])
    np.testing.assert_array_equal(pp.binarize_label(label, foreground=(2,)), [[[0, 0, 1, 0, 0]]])


# ----------------------------------------------------------------------------- the record


def _record(shape=(37, 41, 29), grid=(32, 36, 40)) -> PreprocessRecord:
    return PreprocessRecord.create(shape, AFFINE, nib.io_orientation(AFFINE), grid, "nonzero")


def test_record_geometry_matches_nibabel_canonical() -> None:
    shape = (37, 41, 29)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    img = nib.Nifti1Image(data, AFFINE)
    canonical = nib.as_closest_canonical(img)
    rec = _record(shape)
    assert rec.ras_shape == canonical.shape
    np.testing.assert_allclose(rec.ras_affine, canonical.affine, atol=1e-6)
    np.testing.assert_allclose(rec.spacing, canonical.header.get_zooms()[:3], rtol=1e-6)
    grid = rec.to_grid(data)
    expected, _ = pp.crop_or_pad(np.asarray(canonical.dataobj), rec.volume_shape)
    np.testing.assert_array_equal(grid, expected)


def test_record_grid_affine_maps_grid_voxels_to_their_source_world_position() -> None:
    shape = (37, 41, 29)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rec = _record(shape)
    grid = rec.to_grid(data, fill=-1)
    inv = np.linalg.inv(AFFINE)
    rng = np.random.default_rng(4)
    hits = 0
    for g in rng.integers(0, rec.volume_shape, size=(200, 3)):
        src = inv @ rec.grid_affine @ np.append(g, 1.0)
        idx = np.rint(src[:3]).astype(int)
        np.testing.assert_allclose(src[:3], idx, atol=1e-6)
        if all(0 <= i < s for i, s in zip(idx, shape)):
            assert grid[tuple(g)] == data[tuple(idx)]
            hits += 1
        else:
            assert grid[tuple(g)] == -1
    assert hits > 50


def test_record_round_trip_to_original_and_json() -> None:
    shape = (37, 41, 29)
    rng = np.random.default_rng(5)
    data = rng.integers(1, 100, size=shape).astype(np.float32)
    rec = _record(shape, grid=(48, 48, 48))  # pad only: fully reversible
    assert not rec.cropped
    np.testing.assert_array_equal(rec.to_original(rec.to_grid(data), order=1), data)
    restored = PreprocessRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert restored == rec
    with pytest.raises(ValueError, match="preprocess record: malformed"):
        PreprocessRecord.from_dict({"original_shape": [1, 2, 3]})


def test_preprocess_image_and_label_round_trip() -> None:
    shape = (37, 41, 29)
    rng = np.random.default_rng(6)
    channels = [rng.integers(0, 300, size=shape).astype(np.int16) for _ in range(2)]
    image, rec = pp.preprocess_image(channels, AFFINE, nib.io_orientation(AFFINE), (32, 36, 40))
    assert image.shape == (2, 32, 36, 40) and image.dtype == np.float32
    back = rec.to_original(pp.invert_zscore(image, rec.means, rec.stds, rec.zscore_mask), order=1)
    src = np.stack(channels).astype(np.float32)
    kept = rec.to_original(np.ones((32, 36, 40), dtype=bool), order=0)  # voxels that survived the crop
    np.testing.assert_allclose(back[:, kept], src[:, kept], rtol=1e-5, atol=1e-3)

    label = np.zeros(shape, dtype=np.uint8)
    label[0:3, 10:20, 10:20] = 2  # partly outside the cropped grid
    grid_label, lost = pp.preprocess_label(label, rec, (0, 1, 2))
    assert grid_label.dtype == np.uint8 and set(np.unique(grid_label)) == {0, 1}
    assert lost == int((label > 0).sum()) - int(grid_label.sum()) and lost > 0
    with pytest.raises(ValueError, match="label shape"):
        pp.preprocess_label(np.zeros((5, 5, 5)), rec, (0, 1))
