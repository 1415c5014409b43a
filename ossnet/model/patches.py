"""Patch encoder: maps the full-resolution patch around each query point to a local feature."""

from __future__ import annotations

from torch import Tensor, nn

from ossnet.model.layers import check_shape, make_activation


class PatchEncoder(nn.Module):
    """Two same-size Conv3d layers C -> max(C/2, 1) -> 1, each followed by the activation.

    In the paper the kernel spans the whole patch (kernel = patch size, padding = size // 2), so
    every output voxel sees the entire patch; a smaller kernel (the small presets use 3) cuts the
    cost per point ~(size/kernel)^3 on CPU. The single output channel is flattened to a
    ``size**3`` feature.

    Args:
        in_channels: patch channels (image channels, doubled for multiscale patches).
        size: patch edge length (odd).
        activation: activation name.
        kernel: convolution kernel edge (odd); None means ``size``.
    """

    def __init__(self, in_channels: int, size: int, activation: str, kernel: int | None = None) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"patch.size: must be an odd positive integer, got {size}")
        kernel = size if kernel is None else kernel
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"patch.kernel: must be an odd positive integer, got {kernel}")
        mid = max(in_channels // 2, 1)
        self.in_channels = in_channels
        self.size = size
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, mid, kernel_size=kernel, padding=kernel // 2),
            make_activation(activation),
            nn.Conv3d(mid, 1, kernel_size=kernel, padding=kernel // 2),
            make_activation(activation),
        )

    @property
    def feature_dim(self) -> int:
        """Length of the local feature (``size**3``)."""
        return self.size**3

    def forward(self, patches: Tensor) -> Tensor:
        """``[B, N, C, k, k, k]`` -> local features ``[B, N, k**3]``."""
        k = self.size
        check_shape("patches", patches, (-1, -1, self.in_channels, k, k, k))
        b, n = patches.shape[:2]
        out = self.net(patches.reshape(b * n, self.in_channels, k, k, k))
        return out.reshape(b, n, k**3)


__all__ = ["PatchEncoder"]
