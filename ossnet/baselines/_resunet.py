"""Dimension-generic residual U-Net shared by the 2D and 3D baselines.

The paper's baselines (Table 1 and 2) are residual U-Nets. This module builds the same design
for 2 or 3 spatial dimensions so the two baselines cannot drift apart:

* residual unit: conv3 (no bias) -> BN -> act -> conv3 (no bias) -> BN, plus a shortcut
  (identity, or 1x1 conv + BN when the channel count changes), then act;
* ``units_per_level`` residual units per level on the way down and on the way up;
* downsampling by max-pooling (or a strided 2x conv), upsampling by transposed conv (or
  linear interpolation followed by a 1x1 conv), skip connections by concatenation;
* a 1x1 output conv to ``out_channels`` logits.

Inputs whose spatial sizes are not multiples of ``2**(levels - 1)`` are zero-padded at the far
end of each axis and the output is cropped back, so any size works.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ossnet.model.layers import make_activation

DOWNSAMPLING: tuple[str, ...] = ("maxpool", "stride")
UPSAMPLING: tuple[str, ...] = ("transpose", "interpolate")


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv, BatchNorm, MaxPool, ConvTranspose) classes for ``dims`` spatial dimensions."""
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d
    if dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d
    raise ValueError(f"dims: must be 2 or 3, got {dims}")


class ResidualUnit(nn.Module):
    """conv3-BN-act-conv3-BN plus shortcut, then act. Keeps the spatial size.

    Args:
        dims: 2 or 3 spatial dimensions.
        in_channels: input channels.
        out_channels: output channels; a 1x1 conv + BN shortcut is used when they differ.
        activation: activation name (``ossnet.config.ACTIVATIONS``).
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, activation: str) -> None:
        super().__init__()
        conv, norm, _, _ = _layers(dims)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, bias=False), norm(out_channels))
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in, *S] -> [B, out, *S]``."""
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


def _stage(dims: int, in_channels: int, out_channels: int, units: int, activation: str) -> nn.Sequential:
    """``units`` residual units; the first one changes the channel count."""
    return nn.Sequential(
        *(ResidualUnit(dims, in_channels if i == 0 else out_channels, out_channels, activation) for i in range(units))
    )


class ResidualUNet(nn.Module):
    """Residual U-Net for ``dims`` spatial dimensions producing per-pixel/voxel logits.

    Args:
        dims: 2 or 3.
        in_channels: image channels (modalities).
        out_channels: logit channels (1 for binary segmentation).
        channels: channels per level, top to bottom; ``len(channels) - 1`` downsamplings.
        units_per_level: residual units per level in the encoder and again in the decoder.
        downsampling: "maxpool" (2x max-pool) or "stride" (2x conv with stride 2).
        upsampling: "transpose" (2x transposed conv) or "interpolate" (linear upsampling + 1x1 conv).
        activation: activation name.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        units_per_level: int = 2,
        downsampling: str = "maxpool",
        upsampling: str = "transpose",
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        conv, _, pool, convT = _layers(dims)
        channels = tuple(int(c) for c in channels)
        if in_channels < 1:
            raise ValueError(f"in_channels: must be >= 1, got {in_channels}")
        if out_channels < 1:
            raise ValueError(f"out_channels: must be >= 1, got {out_channels}")
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"channels: need at least one level of >= 1 channels, got {channels}")
        if units_per_level < 1:
            raise ValueError(f"units_per_level: must be >= 1, got {units_per_level}")
        if downsampling not in DOWNSAMPLING:
            raise ValueError(f"downsampling: unknown {downsampling!r}; choose from {', '.join(DOWNSAMPLING)}")
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling: unknown {upsampling!r}; choose from {', '.join(UPSAMPLING)}")
        make_activation(activation)  # validate the name once, with a clear error
        self.dims = dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels

        self.encoder = nn.ModuleList()
        self.down = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(channels):
            if level > 0:
                if downsampling == "maxpool":
                    self.down.append(pool(2))
                else:
                    self.down.append(conv(previous, previous, 2, stride=2, bias=False))
            self.encoder.append(_stage(dims, previous, width, units_per_level, activation))
            previous = width

        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        mode = "bilinear" if dims == 2 else "trilinear"
        for level in range(len(channels) - 2, -1, -1):
            deep, width = channels[level + 1], channels[level]
            if upsampling == "transpose":
                self.up.append(convT(deep, width, 2, stride=2))
            else:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, align_corners=False), conv(deep, width, 1))
                )
            self.decoder.append(_stage(dims, 2 * width, width, units_per_level, activation))
        self.head = conv(channels[0], out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes are padded internally to a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment an image.

        Args:
            x: ``[B, in_channels, *S]`` with ``len(S) == dims``; any spatial size.

        Returns:
            Logits ``[B, out_channels, *S]``.
        """
        if x.dim() != self.dims + 2:
            raise ValueError(f"input: expected a {self.dims + 2}-d tensor [B, C, *spatial], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input: expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        m = self.size_multiple
        extra = [(-s) % m for s in spatial]
        if any(extra):
            # F.pad takes (last_lo, last_hi, ..., first_lo, first_hi); pad only the far end.
            pads: list[int] = []
            for e in reversed(extra):
                pads += [0, e]
            x = F.pad(x, pads)

        skips: list[Tensor] = []
        for level, stage in enumerate(self.encoder):
            if level > 0:
                x = self.down[level - 1](x)
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, stage in zip(self.up, self.decoder):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
        out = self.head(x)
        if any(extra):
            out = out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
        return out


__all__ = ["DOWNSAMPLING", "UPSAMPLING", "ResidualUNet", "ResidualUnit"]
