"""Augmentation: parameter sampling and consistent, deterministic application."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ossnet.augment import AugmentParams, apply_augment, sample_augment_params
from ossnet.config import AugmentConfig

SHAPE = (37, 41, 29)


def make_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = np.arange(2 * np.prod(SHAPE), dtype=np.float32).reshape((2,) + SHAPE)
    label = (rng.random(SHAPE) < 0.3).astype(np.uint8)
    band = rng.random(SHAPE) < 0.1
    points = rng.integers(0, SHAPE, size=(500, 3))
    return image, label, band, points


def test_identity_params_change_nothing():
    image, label, band, points = make_case()
    params = AugmentParams()
    assert params.is_identity
    out_image, out_label, out_band, out_points = apply_augment(params, image, label, band, points)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
    np.testing.assert_array_equal(out_band, band)
    np.testing.assert_array_equal(out_points, points)


@pytest.mark.parametrize("axes", [c for r in (1, 2, 3) for c in itertools.combinations(range(3), r)])
def test_flip_keeps_image_label_band_and_points_consistent(axes):
    image, label, band, points = make_case(1)
    params = AugmentParams(flip_axes=axes)
    out_image, out_label, out_band, out_points = apply_augment(params, image, label, band, points)
    np.testing.assert_array_equal(out_label, np.flip(label, axes))
    np.testing.assert_array_equal(out_band, np.flip(band, axes))
    np.testing.assert_array_equal(out_image, np.flip(image, [a + 1 for a in axes]))
    idx_out, idx_in = tuple(out_points.T), tuple(points.T)
    np.testing.assert_array_equal(out_label[idx_out], label[idx_in])
    np.testing.assert_array_equal(out_band[idx_out], band[idx_in])
    np.testing.assert_array_equal(out_image[(slice(None),) + idx_out], image[(slice(None),) + idx_in])
    assert out_image.flags.c_contiguous and out_label.flags.c_contiguous
    assert (out_points >= 0).all() and (out_points < np.array(SHAPE)).all()


def test_brightness_adds_a_per_channel_offset():
    image, label, _, _ = make_case()
    params = AugmentParams(flip_axes=(2,), brightness=(1.5, -4.0))
    out, _, _, _ = apply_augment(params, image, label)
    diff = out - np.flip(image, 3)
    np.testing.assert_allclose(diff[0], 1.5, atol=1e-2)
    np.testing.assert_allclose(diff[1], -4.0, atol=1e-2)


def test_noise_is_deterministic_and_has_the_requested_sigma():
    image = np.zeros((2,) + SHAPE, np.float32)
    label = np.zeros(SHAPE, np.uint8)
    params = AugmentParams(flip_axes=(0, 1), brightness=(1.0, 2.0), noise_sigma=0.3, noise_seed=7)
    first, _, _, _ = apply_augment(params, image, label)
    second, _, _, _ = apply_augment(params, image, label)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32
    for c, offset in enumerate((1.0, 2.0)):
        assert abs(first[c].mean() - offset) < 0.01
        assert abs(first[c].std() - 0.3) < 0.01
    other, _, _, _ = apply_augment(AugmentParams(noise_sigma=0.3, noise_seed=8), image, label)
    assert not np.array_equal(other, first - np.array([1.0, 2.0], np.float32).reshape(-1, 1, 1, 1))


def test_label_at_augmented_points_equals_original_label_with_every_augmentation():
    image, label, _, points = make_case(2)
    cfg = AugmentConfig(p_flip=1.0, p_brightness=1.0, p_noise=1.0)
    params = sample_augment_params(cfg, image, np.random.default_rng(3))
    _, out_label, _, out_points = apply_augment(params, image, label, points=points)
    np.testing.assert_array_equal(out_label[tuple(out_points.T)], label[tuple(points.T)])


def test_sample_params_respect_probabilities_and_magnitudes():
    image, _, _, _ = make_case()
    off = sample_augment_params(AugmentConfig.off(), image, np.random.default_rng(0))
    assert off.is_identity
    cfg = AugmentConfig(p_flip=1.0, p_brightness=1.0, brightness=0.15, p_noise=1.0, noise_sigma=0.2)
    maxima = image.reshape(2, -1).max(axis=1)
    for seed in range(20):
        params = sample_augment_params(cfg, image, np.random.default_rng(seed))
        assert params.flip_axes and set(params.flip_axes) <= {0, 1, 2}
        assert params.brightness is not None and len(params.brightness) == 2
        assert all(abs(b) <= 0.15 * m for b, m in zip(params.brightness, maxima))
        assert params.noise_sigma == 0.2


def test_sample_params_frequencies_and_all_axis_subsets():
    image = np.ones((1, 4, 4, 4), np.float32)
    cfg = AugmentConfig(p_flip=0.5, p_brightness=0.5, p_noise=0.5)
    rng = np.random.default_rng(4)
    draws = [sample_augment_params(cfg, image, rng) for _ in range(2000)]
    for fraction in (
        np.mean([bool(p.flip_axes) for p in draws]),
        np.mean([p.brightness is not None for p in draws]),
        np.mean([p.noise_sigma > 0 for p in draws]),
    ):
        assert 0.45 < fraction < 0.55
    assert len({p.flip_axes for p in draws if p.flip_axes}) == 7


def test_stream_consumption_does_not_depend_on_the_outcome():
    image, _, _, _ = make_case()
    rng_off, rng_on = np.random.default_rng(5), np.random.default_rng(5)
    sample_augment_params(AugmentConfig.off(), image, rng_off)
    sample_augment_params(AugmentConfig(p_flip=1.0, p_brightness=1.0, p_noise=1.0), image, rng_on)
    assert rng_off.integers(0, 2**62) == rng_on.integers(0, 2**62)


def test_params_validation_and_record():
    with pytest.raises(ValueError, match="flip_axes"):
        AugmentParams(flip_axes=(3,))
    with pytest.raises(ValueError, match="flip_axes"):
        AugmentParams(flip_axes=(1, 1))
    with pytest.raises(ValueError, match="noise_sigma"):
        AugmentParams(noise_sigma=-1.0)
    record = AugmentParams(flip_axes=(0, 2), brightness=(0.5,), noise_sigma=0.1, noise_seed=3).to_dict()
    assert record == {"flip_axes": [0, 2], "brightness": [0.5], "noise_sigma": 0.1, "noise_seed": 3}
    image, label, _, _ = make_case()
    with pytest.raises(ValueError, match="label"):
        apply_augment(AugmentParams(), image, label[:-1])
    with pytest.raises(ValueError, match="brightness"):
        apply_augment(AugmentParams(brightness=(1.0,)), image, label)
