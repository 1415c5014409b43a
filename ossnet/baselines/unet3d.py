"""3D residual U-Net baseline (the paper's "3D residual U-Net", Tables 1 and 2).

Fairness note: the default model is sized like the paper's baseline, base 16 channels
(16-32-64-128-256) with two residual units per level. It is the reference point for the
memory benchmark (``bench/memory.py``); it must never be widened (or narrowed) to flatter the
OSS-Net / U-Net memory ratio. Tiny widths are for unit tests only.
"""

from __future__ import annotations

from typing import Sequence

from ossnet.baselines._resunet import ResidualUNet

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)


class ResidualUNet3D(ResidualUNet):
    """3D residual U-Net: ``(B, C, X, Y, Z) -> logits (B, out_channels, X, Y, Z)``.

    Residual units are conv3-BN-act-conv3-BN plus a shortcut (1x1 conv + BN when the channel
    count changes), then act; two per level on the way down and up; max-pool (or strided conv)
    downsampling, transposed-conv (or trilinear) upsampling, skip concatenation and a 1x1 output
    conv. Odd sizes are padded to a multiple of ``2**(len(channels) - 1)`` and cropped back.

    Sized fairly: base 16 channels (16-32-64-128-256) and two residual units per level, as
    in the paper's baseline. Never widen it to flatter the memory ratio in the benchmark.

    Args:
        in_channels: image channels (4 for BraTS, 1 for LiTS).
        out_channels: logit channels (1 for binary segmentation).
        channels: channels per level (tests may pass tiny widths for speed).
        units_per_level: residual units per level.
        downsampling: "maxpool" or "stride".
        upsampling: "transpose" or "interpolate" (trilinear + 1x1 conv).
        activation: activation name.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        units_per_level: int = 2,
        downsampling: str = "maxpool",
        upsampling: str = "transpose",
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__(
            3,
            in_channels,
            out_channels,
            channels=channels,
            units_per_level=units_per_level,
            downsampling=downsampling,
            upsampling=upsampling,
            activation=activation,
        )


__all__ = ["DEFAULT_CHANNELS", "ResidualUNet3D"]
