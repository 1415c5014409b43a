"""3D CNN encoders over the x2-downscaled volume: plain and skip latents, low-resolution head.

Every residual block halves each spatial axis with ceil rounding, so odd grids work and the last
block's grid equals ``ModelConfig.latent_shape``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ossnet.model.layers import ceil_avg_pool3d, make_activation, make_norm3d


def _conv5(in_channels: int, out_channels: int, bias: bool) -> nn.Conv3d:
    """5^3 convolution that keeps the spatial size."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=5, padding=2, bias=bias)


class ResidualBlock3d(nn.Module):
    """conv3 -> BN -> act -> AvgPool2 -> conv3 -> BN, plus a (1^3 conv ->) AvgPool2 shortcut, then act.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        activation: activation name.
        norm: "batch", "instance" or "group" (``make_norm3d``).
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str, norm: str = "batch") -> None:
        super().__init__()
        # Convolutions feeding a norm carry no bias: the norm's shift makes it redundant.
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = make_norm3d(norm, out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = make_norm3d(norm, out_channels)
        self.shortcut: nn.Module = (
            nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, Cin, X, Y, Z]`` -> ``[B, Cout, ceil(X/2), ceil(Y/2), ceil(Z/2)]``."""
        out = ceil_avg_pool3d(self.act1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act2(out + ceil_avg_pool3d(self.shortcut(x)))


class Backbone3d(nn.Module):
    """Stack of residual blocks; returns every block's output (the skip encoder needs them all).

    Args:
        in_channels: image channels.
        channels: output channels per block.
        activation: activation name.
        norm: encoder normalisation (``make_norm3d``).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], activation: str, norm: str = "batch") -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(
            ResidualBlock3d(c_in, c_out, activation, norm) for c_in, c_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, C, *lowres_input_shape]`` -> list of ``[B, channels[i], *grid_i]``, last on ``latent_shape``."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class PlainLatentHead(nn.Module):
    """conv5 (last -> 1) + BN + act on the last block, flattened: one latent vector per volume.

    Args:
        in_channels: channels of the last encoder block.
        activation: activation name.
        norm: normalisation (``make_norm3d``).
    """

    def __init__(self, in_channels: int, activation: str, norm: str = "batch") -> None:
        super().__init__()
        self.conv = _conv5(in_channels, 1, bias=False)
        self.bn = make_norm3d(norm, 1)
        self.act = make_activation(activation)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Block outputs (last ``[B, C, *latent_shape]``) -> latent ``[B, 1, latent_dim]``."""
        return self.act(self.bn(self.conv(features[-1]))).flatten(start_dim=2)


class SkipLatentHead(nn.Module):
    """Multi-scale global latent of the skip encoder (variants C, D).

    Every block output is adaptive-max-pooled to the latent grid, reduced by conv5 (c -> c/2) +
    BN + act, the results are concatenated and mapped by conv5 -> ``latent_channels`` + BN + act.

    Args:
        channels: output channels of every encoder block.
        latent_shape: grid of the last block ``(x, y, z)``.
        latent_channels: latent vectors per volume (1 for the decoder input + one per decoder block).
        activation: activation name.
        norm: normalisation (``make_norm3d``).
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        latent_shape: tuple[int, int, int],
        latent_channels: int,
        activation: str,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.reducers = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveMaxPool3d(latent_shape),
                _conv5(c, c // 2, bias=False),
                make_norm3d(norm, c // 2),
                make_activation(activation),
            )
            for c in channels
        )
        self.fuse = nn.Sequential(
            _conv5(sum(c // 2 for c in channels), latent_channels, bias=False),
            make_norm3d(norm, latent_channels),
            make_activation(activation),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        """Block outputs -> latent ``[B, latent_channels, latent_dim]``."""
        reduced = [reducer(f) for reducer, f in zip(self.reducers, features)]
        return self.fuse(torch.cat(reduced, dim=1)).flatten(start_dim=2)


class LowResHead(nn.Module):
    """conv5 (last -> K) on the last block: low-resolution segmentation logits (variants C, D).

    Args:
        in_channels: channels of the last encoder block.
        n_outputs: K, one per target output (1 for the paper's binary model).
    """

    def __init__(self, in_channels: int, n_outputs: int = 1) -> None:
        super().__init__()
        self.conv = _conv5(in_channels, n_outputs, bias=True)

    def forward(self, last: Tensor) -> Tensor:
        """``[B, C, *latent_shape]`` -> logits ``[B, K, *latent_shape]``."""
        return self.conv(last)


__all__ = ["Backbone3d", "LowResHead", "PlainLatentHead", "ResidualBlock3d", "SkipLatentHead"]
