"""Patch encoder: maps the full-resolution patch around each query point to a local feature."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ossnet.model.layers import check_shape, make_activation


def conv_as_matrix_index(size: int, kernel: int) -> tuple[Tensor, Tensor]:
    """Index map turning a same-padded 3D convolution on a ``size**3`` grid into a matrix.

    A zero-padded convolution of a tiny ``size**3`` patch is a linear map from
    ``C_in * size**3`` to ``C_out * size**3`` values whose entries are kernel weights. For every
    (output voxel, input voxel) pair this returns which kernel tap connects them.

    Returns:
        ``(tap, valid)``: ``tap`` int64 ``[size**3, size**3]`` flat kernel index (0 where
        invalid) and ``valid`` bool ``[size**3, size**3]``, rows = output voxels.
    """
    axis = torch.arange(size)
    pos = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    offset = pos[None, :, :] - pos[:, None, :] + kernel // 2
    valid = ((offset >= 0) & (offset < kernel)).all(dim=-1)
    tap = (offset[..., 0] * kernel + offset[..., 1]) * kernel + offset[..., 2]
    return torch.where(valid, tap, torch.zeros_like(tap)), valid


class PatchEncoder(nn.Module):
    """Two same-size Conv3d layers C -> max(C/2, 1) -> 1, each followed by the activation.

    In the paper the kernel spans the whole patch (kernel = patch size, padding = size // 2), so
    every output voxel sees the entire patch; a smaller kernel (the small presets use 3) cuts the
    cost per point ~(size/kernel)^3. The single output channel is flattened to a ``size**3``
    feature.

    The weights are ordinary ``nn.Conv3d`` parameters, but by default the forward pass applies
    each convolution as one dense matrix product (``conv_as_matrix_index``): exact to float
    rounding, and several times faster than a batched 3D convolution over thousands of 7^3
    patches (measured 7x on CPU for the 7^3 kernel). The dense matrix costs the same for any
    kernel, so small kernels (``2 * kernel <= size``) keep the convolutions by default.

    Args:
        in_channels: patch channels (image channels, doubled for multiscale patches).
        size: patch edge length (odd).
        activation: activation name.
        kernel: convolution kernel edge (odd); None means ``size``.
        use_matmul: apply the convolutions as dense matrix products (None: when ``2 * kernel > size``).
    """

    def __init__(
        self, in_channels: int, size: int, activation: str, kernel: int | None = None, use_matmul: bool | None = None
    ) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"patch.size: must be an odd positive integer, got {size}")
        kernel = size if kernel is None else kernel
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"patch.kernel: must be an odd positive integer, got {kernel}")
        mid = max(in_channels // 2, 1)
        self.in_channels = in_channels
        self.size = size
        self.use_matmul = 2 * kernel > size if use_matmul is None else use_matmul
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, mid, kernel_size=kernel, padding=kernel // 2),
            make_activation(activation),
            nn.Conv3d(mid, 1, kernel_size=kernel, padding=kernel // 2),
            make_activation(activation),
        )
        tap, valid = conv_as_matrix_index(size, kernel)
        self.register_buffer("_tap", tap, persistent=False)
        self.register_buffer("_valid", valid, persistent=False)

    @property
    def feature_dim(self) -> int:
        """Length of the local feature (``size**3``)."""
        return self.size**3

    def _conv_matrix(self, conv: nn.Conv3d) -> Tensor:
        """``[C_out * size**3, C_in * size**3]`` matrix equal to ``conv`` on one patch."""
        c_out, c_in = conv.weight.shape[:2]
        v = self.size**3
        tap, valid = cast(Tensor, self._tap), cast(Tensor, self._valid)  # buffers
        taps = conv.weight.reshape(c_out, c_in, -1)[:, :, tap]  # [C_out, C_in, V_out, V_in]
        taps = taps * valid.to(taps.dtype)
        return taps.permute(0, 2, 1, 3).reshape(c_out * v, c_in * v)

    def forward(self, patches: Tensor) -> Tensor:
        """``[B, N, C, k, k, k]`` -> local features ``[B, N, k**3]``."""
        k = self.size
        check_shape("patches", patches, (-1, -1, self.in_channels, k, k, k))
        b, n = patches.shape[:2]
        if not self.use_matmul:
            out = self.net(patches.reshape(b * n, self.in_channels, k, k, k))
            return out.reshape(b, n, k**3)
        x = patches.reshape(b * n, -1)
        v = k**3
        for layer, act in ((self.net[0], self.net[1]), (self.net[2], self.net[3])):
            conv = cast(nn.Conv3d, layer)
            bias = conv.bias.repeat_interleave(v) if conv.bias is not None else None
            x = act(F.linear(x, self._conv_matrix(conv).to(x.dtype), None if bias is None else bias.to(x.dtype)))
        return x.reshape(b, n, v)


__all__ = ["PatchEncoder", "conv_as_matrix_index"]
