"""Residual U-Net baselines: shapes at odd sizes, gradient flow, slice-wise reassembly."""

from __future__ import annotations

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
