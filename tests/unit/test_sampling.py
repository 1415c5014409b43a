"""Point sampling, border band, patch extraction, resolution helpers and training rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from ossnet.augment import sample_augment_params
from ossnet.config import AugmentConfig, SamplingConfig, model_config
from ossnet.sampling import (
    border_band,
    downsample_image,
    extract_patches,
    lowres_label,
    normalize_points,
    pool_volume,
    sample_points,
    training_sample,
)

SHAPE = (37, 41, 29)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blob_label(shape=SHAPE, center=(18, 20, 14), radius=7.0, seed=0) -> np.ndarray:
    """An irregular blob: a sphere with random voxels toggled near its surface."""
    grid = np.indices(shape).astype(np.float64)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
    noise = np.random.default_rng(seed).uniform(-1.5, 1.5, shape)
    return (dist + noise < radius).astype(np.uint8)


def naive_band(label: np.ndarray, width: int) -> np.ndarray:
    """Reference: scipy gradient magnitude on the full volume, then a full max filter."""
    grad = ndimage.generic_gradient_magnitude((label > 0).astype(np.float64), ndimage.sobel)
    return ndimage.maximum_filter((grad > 0).astype(np.uint8), size=2 * width + 1, mode="constant") > 0


def naive_patch(volume: np.ndarray, point, size: int) -> np.ndarray:
    h = size // 2
    padded = np.pad(volume, [(0, 0)] + [(h, h)] * 3)
    x, y, z = point
    return padded[:, x : x + size, y : y + size, z : z + size]


def naive_coarse(volume: np.ndarray, point, size: int) -> np.ndarray:
    """The 2k window p-k .. p+k-1 with zeros outside, mean-pooled by 2."""
    padded = np.pad(volume, [(0, 0)] + [(size, size)] * 3).astype(np.float64)
    x, y, z = point  # padded index of voxel p - k is p
    window = padded[:, x : x + 2 * size, y : y + 2 * size, z : z + 2 * size]
    c = volume.shape[0]
    return window.reshape(c, size, 2, size, 2, size, 2).mean(axis=(2, 4, 6))


def probe_points() -> np.ndarray:
    """Corners, edges, faces and random interior points of SHAPE."""
    corners = [[a, b, c] for a in (0, SHAPE[0] - 1) for b in (0, SHAPE[1] - 1) for c in (0, SHAPE[2] - 1)]
    edges = [[1, 2, 3], [SHAPE[0] - 2, 20, SHAPE[2] - 3], [18, 0, 14], [3, SHAPE[1] - 1, 27], [10, 10, 0]]
    interior = np.random.default_rng(1).integers(7, np.array(SHAPE) - 7, size=(20, 3))
    return np.concatenate([np.array(corners + edges), interior]).astype(np.int64)


# --------------------------------------------------------------------------- border band


@pytest.mark.parametrize("width", [0, 2, 6])
def test_border_band_matches_full_volume_reference(width):
    label = blob_label()
    label[:, :, :3] = 1  # a slab touching the volume border: no boundary at the edge itself
    band = border_band(label, width)
    assert band.dtype == bool and band.shape == SHAPE
    np.testing.assert_array_equal(band, naive_band(label, width))


def test_border_band_contains_the_boundary_and_nothing_far():
    label = blob_label()
    band = border_band(label, 2)
    eroded = ndimage.binary_erosion(label)
    boundary = (label > 0) & ~eroded
    assert band[boundary].all()
    far_inside = ndimage.binary_erosion(label, iterations=4, structure=np.ones((3, 3, 3)))
    far_outside = ~ndimage.binary_dilation(label, iterations=4, structure=np.ones((3, 3, 3)))
    assert not band[far_inside].any() and not band[far_outside].any()


def test_border_band_empty_and_full_labels():
    assert not border_band(np.zeros(SHAPE, np.uint8)).any()
    assert not border_band(np.ones(SHAPE, np.uint8)).any()


# --------------------------------------------------------------------------- sample_points


def test_sample_points_border_fraction_and_band_membership():
    label = blob_label()
    band = border_band(label, 2)
    n, ratio = 6000, 0.4
    points = sample_points(label, n, ratio, np.random.default_rng(0), band_width=2)
    assert points.shape == (n, 3) and points.dtype == np.int64
    assert (points >= 0).all() and (points < np.array(SHAPE)).all()
    in_band = band[tuple(points.T)].mean()
    expected = ratio + (1 - ratio) * band.mean()
    sd = np.sqrt(expected * (1 - expected) / n)
    assert abs(in_band - expected) < 5 * sd

    only_border = sample_points(label, 2000, 1.0, np.random.default_rng(1), band_width=2)
    assert band[tuple(only_border.T)].all()


def test_sample_points_accepts_precomputed_band_as_mask_or_indices():
    label = blob_label()
    band = border_band(label, 3)
    from_mask = sample_points(label, 500, 1.0, np.random.default_rng(2), band=band)
    assert band[tuple(from_mask.T)].all()
    from_uint8 = sample_points(label, 500, 1.0, np.random.default_rng(2), band=band.astype(np.uint8))
    np.testing.assert_array_equal(from_uint8, from_mask)
    indices = np.argwhere(band)[:5]
    from_indices = sample_points(label, 300, 1.0, np.random.default_rng(2), band=indices)
    assert {tuple(p) for p in from_indices} <= {tuple(p) for p in indices}


def test_sample_points_uniform_is_uniform():
    n = 20000
    points = sample_points(np.zeros(SHAPE, np.uint8), n, 0.0, np.random.default_rng(3))
    for axis, size in enumerate(SHAPE):
        counts = np.bincount(points[:, axis], minlength=size)
        assert counts.size == size  # never outside the volume
        expected = n / size
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < size + 6 * np.sqrt(2 * size)  # mean = dof, generous upper tail


def test_sample_points_empty_band_falls_back_to_uniform_and_is_seeded():
    empty = np.zeros(SHAPE, np.uint8)
    points = sample_points(empty, 1000, 0.5, np.random.default_rng(4))
    assert points.shape == (1000, 3) and (points < np.array(SHAPE)).all()
    again = sample_points(empty, 1000, 0.5, np.random.default_rng(4))
    np.testing.assert_array_equal(points, again)


def test_sample_points_rejects_bad_arguments():
    with pytest.raises(ValueError, match="border_ratio"):
        sample_points(np.zeros(SHAPE), 10, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="band"):
        sample_points(np.zeros(SHAPE), 10, 0.5, np.random.default_rng(0), band=np.zeros((3, 3, 3), bool))


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("size", [1, 5, 7])
def test_every_patch_equals_the_volume_around_its_point(size):
    volume = np.arange(2 * np.prod(SHAPE), dtype=np.float32).reshape((2,) + SHAPE) + 1.0
    points = probe_points()
    patches = extract_patches(volume, points, size)
    assert isinstance(patches, np.ndarray) and patches.shape == (len(points), 2, size, size, size)
    for point, patch in zip(points, patches):
        np.testing.assert_array_equal(patch, naive_patch(volume, point, size))


def test_zero_padding_at_corners():
    volume = np.full((1,) + SHAPE, 5.0, dtype=np.float32)
    h = 3
    low = extract_patches(volume, np.array([[0, 0, 0]]), 7)[0, 0]
    assert (low[h:, h:, h:] == 5.0).all()
    assert low.sum() == 5.0 * (h + 1) ** 3
    high = extract_patches(volume, np.array([[SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1]]), 7)[0, 0]
    assert (high[: h + 1, : h + 1, : h + 1] == 5.0).all()
    assert high.sum() == 5.0 * (h + 1) ** 3


@pytest.mark.parametrize("size", [3, 7])
def test_multiscale_channels_match_naive_pooling(size):
    rng = np.random.default_rng(5)
    volume = rng.standard_normal((3,) + SHAPE).astype(np.float32)
    points = probe_points()
    patches = extract_patches(volume, points, size, multiscale=True)
    assert patches.shape == (len(points), 6, size, size, size)
    for point, patch in zip(points, patches):
        np.testing.assert_array_equal(patch[:3], naive_patch(volume, point, size))
        np.testing.assert_allclose(patch[3:], naive_coarse(volume, point, size), rtol=1e-5, atol=1e-6)
    reused = extract_patches(volume, points, size, multiscale=True, pooled=pool_volume(volume))
    np.testing.assert_array_equal(reused, patches)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("multiscale", [False, True])
def test_torch_and_numpy_give_identical_patches(device, multiscale):
    volume = np.random.default_rng(6).standard_normal((2,) + SHAPE).astype(np.float32)
    points = probe_points()
    expected = extract_patches(volume, points, 7, multiscale)
    tensor = torch.from_numpy(volume).to(device)
    got = extract_patches(tensor, torch.from_numpy(points).to(device), 7, multiscale)
    assert isinstance(got, torch.Tensor) and got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    with_numpy_points = extract_patches(tensor, points, 7, multiscale)
    np.testing.assert_array_equal(with_numpy_points.cpu().numpy(), expected)


def test_extract_patches_handles_non_contiguous_input_and_rejects_float_points():
    volume = np.arange(np.prod(SHAPE), dtype=np.float32).reshape((1,) + SHAPE)
    flipped = volume[:, ::-1]
    points = probe_points()
    np.testing.assert_array_equal(
        extract_patches(flipped, points, 5), extract_patches(np.ascontiguousarray(flipped), points, 5)
    )
    with pytest.raises(ValueError, match="integer"):
        extract_patches(volume, points.astype(np.float32), 5)
    with pytest.raises(ValueError, match="odd"):
        extract_patches(volume, points, 4)


# --------------------------------------------------------------------------- resolution helpers


def test_normalize_points_maps_corners_to_unit_cube():
    corners = np.array([[0, 0, 0], [SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1], [18, 20, 14]])
    out = normalize_points(corners, SHAPE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)
    np.testing.assert_allclose(out[2], [0.0, 0.0, 0.0], atol=1e-6)
    torch_out = normalize_points(torch.from_numpy(corners), SHAPE)
    assert torch_out.dtype == torch.float32
    np.testing.assert_array_equal(torch_out.numpy(), out)


def test_downsample_image_is_block_mean_for_even_factor_two():
    image = np.random.default_rng(7).standard_normal((2, 8, 6, 4)).astype(np.float32)
    low = downsample_image(image, (4, 3, 2))
    assert isinstance(low, np.ndarray) and low.shape == (2, 4, 3, 2) and low.dtype == np.float32
    expected = image.reshape(2, 4, 2, 3, 2, 2, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(low, expected, rtol=1e-5, atol=1e-6)
    odd = downsample_image(np.full((1,) + SHAPE, 3.0, np.float32), (19, 21, 15))
    np.testing.assert_allclose(odd, 3.0, rtol=1e-6)
    tensor = downsample_image(torch.from_numpy(image), (4, 3, 2))
    np.testing.assert_array_equal(tensor.numpy(), low)


@pytest.mark.parametrize("factor", [1, 4, 8])
def test_lowres_label_is_ceil_mode_max_pool(factor):
    label = np.zeros(SHAPE, np.uint8)
    rng = np.random.default_rng(8)
    label[tuple(rng.integers(0, SHAPE, size=(15, 3)).T)] = 1
    label[SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1] = 1  # in the last, partial cell
    low = lowres_label(label, factor)
    cells = tuple(-(-s // factor) for s in SHAPE)
    assert low.shape == cells and low.dtype == np.uint8
    for i, j, k in itertools.product(*(range(c) for c in cells)):
        block = label[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor, k * factor : (k + 1) * factor]
        assert low[i, j, k] == block.max()


# --------------------------------------------------------------------------- training rows


def _case(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shape = cfg.volume_shape
    label = blob_label(shape, center=tuple(s // 2 for s in shape), radius=min(shape) / 4)
    image = rng.standard_normal((cfg.encoder.in_channels,) + tuple(shape)) + 2.0 * label
    return image.astype(np.float32), label


@pytest.mark.parametrize("variant", ["onet", "C", "D"])
def test_training_sample_shapes_and_labels_at_points(variant):
    cfg = model_config(variant, "tiny", volume_shape=SHAPE)
    image, label = _case(cfg)
    sampling = SamplingConfig(n_points=300, border_ratio=0.5, band_width=2)
    row = training_sample(image, label, cfg, sampling, AugmentConfig.off(), np.random.default_rng(0))
    c = cfg.encoder.in_channels
    assert row["image_lowres"].shape == (c,) + cfg.lowres_input_shape
    assert row["points"].shape == (300, 3) and row["labels"].shape == (300,)
    assert row["label_lowres"].shape == cfg.latent_shape
    assert all(v.dtype == np.float32 for v in row.values())
    if cfg.patch.enabled:
        assert row["patches"].shape == (300, cfg.patch_channels, 7, 7, 7)
    else:
        assert "patches" not in row
    voxels = np.rint((row["points"] + 1) / 2 * (np.array(SHAPE) - 1)).astype(int)
    np.testing.assert_array_equal(row["labels"], label[tuple(voxels.T)])
    np.testing.assert_array_equal(row["label_lowres"], lowres_label(label, cfg.lowres_factor))
    np.testing.assert_allclose(row["image_lowres"], downsample_image(image, cfg.lowres_input_shape))
    if cfg.patch.enabled:
        np.testing.assert_array_equal(row["patches"][:, :c], extract_patches(image, voxels, 7))


def test_training_sample_augmentation_is_consistent():
    cfg = model_config("C", "tiny", volume_shape=SHAPE)
    image, label = _case(cfg, seed=1)
    augment = AugmentConfig(p_flip=1.0, p_brightness=1.0, p_noise=0.0)
    sampling = SamplingConfig(n_points=400, border_ratio=0.5, band_width=2)
    row = training_sample(image, label, cfg, sampling, augment, np.random.default_rng(9))
    params = sample_augment_params(augment, image, np.random.default_rng(9))  # the same first draws
    assert params.flip_axes
    offsets = np.asarray(params.brightness, np.float32).reshape(-1, 1, 1, 1)
    flipped_image = np.ascontiguousarray(np.flip(image, [a + 1 for a in params.flip_axes]) + offsets)
    flipped_label = np.flip(label, params.flip_axes)
    voxels = np.rint((row["points"] + 1) / 2 * (np.array(SHAPE) - 1)).astype(int)
    np.testing.assert_array_equal(row["labels"], flipped_label[tuple(voxels.T)])
    np.testing.assert_allclose(row["patches"], extract_patches(flipped_image, voxels, 7), rtol=1e-6)
    np.testing.assert_array_equal(row["label_lowres"], lowres_label(flipped_label, cfg.lowres_factor))
    expected_lowres = downsample_image(flipped_image, cfg.lowres_input_shape)
    np.testing.assert_allclose(row["image_lowres"], expected_lowres, rtol=1e-5, atol=1e-5)


def test_training_sample_rejects_mismatched_inputs():
    cfg = model_config("C", "tiny", volume_shape=SHAPE)
    image, label = _case(cfg)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image"):
        training_sample(image[:, :-1], label, cfg, SamplingConfig(n_points=8), AugmentConfig.off(), rng)
    with pytest.raises(ValueError, match="channels"):
        training_sample(image[:2], label, cfg, SamplingConfig(n_points=8), AugmentConfig.off(), rng)
    with pytest.raises(ValueError, match="label"):
        training_sample(image, label[:-1], cfg, SamplingConfig(n_points=8), AugmentConfig.off(), rng)
