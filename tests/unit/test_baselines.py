"""Residual U-Net baselines: shapes at odd sizes, gradient flow, slice-wise reassembly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ossnet.baselines import (
    ResidualUNet2D,
    ResidualUNet3D,
    predict_volume_slicewise,
    slices_to_volume,
    volume_to_slices,
)
from ossnet.baselines._resunet import ResidualUnit

TINY = (2, 4, 8)
ODD3 = (37, 41, 29)


@pytest.mark.parametrize(
    ("downsampling", "upsampling"), [("maxpool", "transpose"), ("stride", "interpolate")]
)
def test_unet3d_keeps_odd_spatial_shape(downsampling: str, upsampling: str) -> None:
    torch.manual_seed(0)
    model = ResidualUNet3D(in_channels=4, channels=TINY, downsampling=downsampling, upsampling=upsampling)
    x = torch.randn(2, 4, *ODD3)
    out = model(x)
    assert out.shape == (2, 1, *ODD3)
    assert torch.isfinite(out).all()


def test_unet3d_crop_is_the_unpadded_region() -> None:
    # Zero padding at the far end must not shift the output: the near corner of an odd-sized
    # input is segmented like the same corner inside a padded input whose size is a multiple.
    torch.manual_seed(0)
    model = ResidualUNet3D(in_channels=1, channels=(2, 3), units_per_level=1).eval()
    x = torch.randn(1, 1, 9, 7, 5)
    padded = torch.zeros(1, 1, 10, 8, 6)
    padded[..., :9, :7, :5] = x
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[..., :9, :7, :5], atol=1e-6)


def test_unet3d_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = ResidualUNet3D(in_channels=2, channels=TINY)
    x = torch.randn(1, 2, 19, 13, 11)
    target = (torch.rand(1, 1, 19, 13, 11) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_default_widths_are_the_fair_paper_size() -> None:
    model = ResidualUNet3D()
    assert model.channels == (16, 32, 64, 128, 256)
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    # two units per level going down (5 levels) and two per level going up (4 levels)
    assert len(units) == 2 * 5 + 2 * 4
    assert model.head.out_channels == 1
    assert ResidualUNet2D().channels == (16, 32, 64, 128, 256)


def test_unet_rejects_wrong_input_with_clear_errors() -> None:
    model = ResidualUNet3D(in_channels=4, channels=TINY)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="5-d"):
        model(torch.randn(4, 8, 8, 8))
    with pytest.raises(ValueError, match="upsampling"):
        ResidualUNet3D(upsampling="nearest")
    with pytest.raises(ValueError, match="activation"):
        ResidualUNet2D(activation="pau")


def test_unet2d_keeps_odd_spatial_shape() -> None:
    model = ResidualUNet2D(in_channels=4, channels=TINY, upsampling="interpolate")
    assert model(torch.randn(3, 4, 37, 29)).shape == (3, 1, 37, 29)


def test_slices_round_trip_on_arange_volume() -> None:
    volume = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).reshape(2, 5, 4, 3)
    for axis, expected in ((0, (5, 2, 4, 3)), (1, (4, 2, 5, 3)), (2, (3, 2, 5, 4))):
        slices = volume_to_slices(volume, axis)
        assert slices.shape == expected
        # slice i along the axis is exactly volume[:, ..., i, ...]
        index = [slice(None)] * 4
        index[axis + 1] = 1
        assert torch.equal(slices[1], volume[tuple(index)])
        assert torch.equal(slices_to_volume(slices, axis), volume)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_volume_slicewise_reassembles_each_axis(axis: int) -> None:
    torch.manual_seed(0)
    model = ResidualUNet2D(in_channels=2, channels=TINY)
    model.train()
    image = torch.randn(2, 11, 9, 7)
    logits = predict_volume_slicewise(model, image.numpy(), axis, batch_size=4)
    assert logits.shape == (1, 11, 9, 7)
    assert model.training, "the model's mode must be restored"
    # Slice k of the output is the model applied to slice k of the input.
    model.eval()
    index = [slice(None)] * 4
    index[axis + 1] = 5
    with torch.no_grad():
        expected = model(image[tuple(index)].unsqueeze(0))[0]
    assert torch.allclose(logits[tuple(index)], expected, atol=1e-5)
    # Chunking is invisible in eval mode.
    again = predict_volume_slicewise(model, image, axis, batch_size=100)
    assert torch.allclose(logits, again, atol=1e-5)


def test_predict_volume_slicewise_rejects_bad_axis_and_shape() -> None:
    model = ResidualUNet2D(in_channels=1, channels=TINY)
    with pytest.raises(ValueError, match="axis"):
        predict_volume_slicewise(model, torch.zeros(1, 4, 4, 4), axis=3)
    with pytest.raises(ValueError, match="image"):
        predict_volume_slicewise(model, torch.zeros(4, 4, 4), axis=0)


def test_random_crops_fit_the_volume_and_oversample_foreground():
    from ossnet.baselines.patches import random_crop_starts

    label = np.zeros((40, 30, 20), np.uint8)
    label[35:38, 2:4, 15:17] = 1  # a small target in a corner
    starts = random_crop_starts(label.shape, (16, 16, 8), label, 30, np.random.default_rng(0))
    assert starts.shape == (30, 3)
    assert (starts >= 0).all() and (starts + (16, 16, 8) <= label.shape).all()
    hits = sum(label[a : a + 16, b : b + 16, c : c + 8].any() for a, b, c in starts)
    assert hits >= 10  # a third of the crops hold the target
    with pytest.raises(ValueError, match="fit"):
        random_crop_starts(label.shape, (50, 16, 8), label, 1, np.random.default_rng(0))


def test_sliding_window_equals_one_pass_for_a_pointwise_network():
    from ossnet.baselines.patches import gaussian_importance, sliding_window_predict

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 1, kernel_size=1)  # no context: every window agrees with the full pass
    image = torch.randn(2, 37, 29, 21)
    full = net(image[None])[0].detach()
    for roi, overlap in (((16, 16, 16), 0.5), ((40, 8, 12), 0.25), ((37, 29, 21), 0.0)):
        out = sliding_window_predict(net, image, roi, overlap=overlap, batch_size=3)
        assert out.shape == (1, 37, 29, 21)
        assert torch.allclose(out, full, atol=1e-5), roi
    weights = gaussian_importance((9, 9, 9))
    assert weights.max() == 1.0 and weights[4, 4, 4] == 1.0 and weights.min() > 0
    assert weights[0, 4, 4] < weights[2, 4, 4] < weights[4, 4, 4]
