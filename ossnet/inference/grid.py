"""Rectilinear voxel grids for multiresolution isosurface extraction (MISE).

A level of stride ``h`` over an axis of ``n`` voxels has the nodes ``0, h, 2h, ...`` plus the
far edge ``n - 1`` (so the last cell may be shorter than ``h``); the nodes of stride ``h/2``
are a superset of those of stride ``h``. A *cell* is the box between consecutive nodes along
every axis. All functions are pure torch ops on the device of their inputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Coords = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def axis_nodes(n: int, stride: int, device: torch.device) -> torch.Tensor:
    """Node coordinates of one axis: ``0, stride, ...`` and ``n - 1``. Returns ``(m,)`` int64."""
    nodes = torch.arange(0, n, stride, device=device, dtype=torch.int64)
    if (n - 1) % stride != 0:
        nodes = torch.cat([nodes, torch.tensor([n - 1], device=device, dtype=torch.int64)])
    return nodes


def level_nodes(shape: Sequence[int], stride: int, device: torch.device) -> Coords:
    """Node coordinates of the three axes at one stride."""
    return tuple(axis_nodes(int(n), stride, device) for n in shape)  # type: ignore[return-value]


def gather(volume: torch.Tensor, coords: Coords) -> torch.Tensor:
    """Values of ``volume`` ``(X, Y, Z)`` at the nodes: ``(mx, my, mz)``."""
    out = volume
    for axis, c in enumerate(coords):
        if c.numel() != out.shape[axis]:
            out = out.index_select(axis, c)
    return out


def scatter(volume: torch.Tensor, coords: Coords, values: torch.Tensor) -> None:
    """Write ``values`` ``(mx, my, mz)`` into ``volume`` at the nodes (in place)."""
    if all(c.numel() == n for c, n in zip(coords, volume.shape)):
        volume.copy_(values)
        return
    cx, cy, cz = coords
    volume[cx[:, None, None], cy[None, :, None], cz[None, None, :]] = values


def to_voxels(index: torch.Tensor, coords: Coords) -> torch.Tensor:
    """Node indices ``(K, 3)`` -> voxel coordinates ``(K, 3)`` int64."""
    return torch.stack([coords[a][index[:, a]] for a in range(3)], dim=1)


def straddling_cells(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cells whose 8 corners disagree: some ``>= threshold``, some below.

    Args:
        values: node values ``(mx, my, mz)``.
    Returns:
        ``(mx - 1, my - 1, mz - 1)`` bool.
    """
    return uncertain_cells(values, threshold, threshold)


def uncertain_cells(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Cells whose corners do not place them safely on one side of the threshold.

    A cell is *safe outside* when every corner is ``< low`` and *safe inside* when every corner
    is ``>= high``; every other cell is uncertain. With ``low == high == threshold`` these are
    exactly the straddling cells.

    Args:
        values: node values ``(mx, my, mz)``.
    Returns:
        ``(mx - 1, my - 1, mz - 1)`` bool.
    """
    v = values[None, None].float()
    highest = F.max_pool3d(v, kernel_size=2, stride=1)[0, 0]
    lowest = -F.max_pool3d(-v, kernel_size=2, stride=1)[0, 0]
    return (highest >= low) & (lowest < high)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a 3D bool mask by a ``(2r+1)^3`` cube (same shape)."""
    if radius <= 0 or not bool(mask.any()):
        return mask
    out = F.max_pool3d(mask.float()[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)
    return out[0, 0] > 0


def cell_corners(cells: torch.Tensor) -> torch.Tensor:
    """Nodes that are a corner of at least one set cell: ``(mx-1, ...)`` -> ``(mx, ...)`` bool."""
    return F.max_pool3d(cells.float()[None, None], kernel_size=2, stride=1, padding=1)[0, 0] > 0


_CUBE = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int64)


def straddling_corners_near(
    nodes: torch.Tensor,
    coords: Coords,
    values: torch.Tensor,
    evaluated: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Sparse step of crack propagation around nodes whose values just changed.

    Only the cells touching ``nodes`` can have changed status, so only those are checked.

    Args:
        nodes: ``(K, 3)`` node indices at this level.
        coords: node coordinates of the level.
        values: ``(X, Y, Z)`` full-resolution value map; evaluated: ``(X, Y, Z)`` bool.
    Returns:
        ``(Q, 3)`` unique node indices: non-evaluated corners of straddling cells among them.
    """
    cube = _CUBE.to(nodes.device)
    size = torch.tensor([c.numel() for c in coords], device=nodes.device)
    cells = (nodes[:, None, :] - cube[None]).reshape(-1, 3)
    cells = cells[((cells >= 0) & (cells <= size - 2)).all(dim=1)]
    cells = _unique_rows(cells, size)
    corners = cells[:, None, :] + cube[None]  # (Q, 8, 3)
    vox = to_voxels(corners.reshape(-1, 3), coords)
    inside = (values[vox[:, 0], vox[:, 1], vox[:, 2]] >= threshold).view(-1, 8)
    straddle = inside.any(dim=1) & ~inside.all(dim=1)
    cand = _unique_rows(corners[straddle].reshape(-1, 3), size)
    vox = to_voxels(cand, coords)
    return cand[~evaluated[vox[:, 0], vox[:, 1], vox[:, 2]]]


def _unique_rows(index: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Unique node indices ``(K, 3)`` (via linear indices, faster than ``unique(dim=0)``)."""
    lin = torch.unique((index[:, 0] * size[1] + index[:, 1]) * size[2] + index[:, 2])
    return torch.stack([lin // (size[1] * size[2]), (lin // size[2]) % size[1], lin % size[2]], dim=1)


def _containing_cells(coarse: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each fine coordinate, the coarse cells on its low and high side (equal inside a cell)."""
    last = coarse.numel() - 2
    hi = (torch.searchsorted(coarse, fine, right=True) - 1).clamp(0, last)
    lo = (torch.searchsorted(coarse, fine, right=False) - 1).clamp(0, last)
    return lo, hi


def in_closed_cells(cells: torch.Tensor, coarse: Coords, fine: Coords) -> torch.Tensor:
    """Fine nodes lying in (or on the boundary of) a set coarse cell.

    Args:
        cells: ``(mx - 1, my - 1, mz - 1)`` bool over the coarse level.
        coarse: coarse node coordinates; fine: fine node coordinates (a superset).
    Returns:
        ``(nx, ny, nz)`` bool over the fine nodes.
    """
    out = cells
    for axis in range(3):
        lo, hi = _containing_cells(coarse[axis], fine[axis])
        out = out.index_select(axis, lo) | out.index_select(axis, hi)
    return out


def interpolate(values: torch.Tensor, coarse: Coords, fine: Coords) -> torch.Tensor:
    """Trilinear interpolation of coarse node values onto the fine nodes (separable, exact on nodes).

    Args:
        values: ``(mx, my, mz)`` float.
    Returns:
        ``(nx, ny, nz)`` float.
    """
    out = values
    for axis in range(3):
        c, f = coarse[axis], fine[axis]
        i = (torch.searchsorted(c, f, right=True) - 1).clamp(0, c.numel() - 2)
        w = ((f - c[i]).float() / (c[i + 1] - c[i]).float()).to(out.dtype)
        view = [1, 1, 1]
        view[axis] = -1
        w = w.view(view)
        lo = out.index_select(axis, i)
        out = out.index_select(axis, i + 1).sub_(lo).mul_(w).add_(lo)  # lo + (hi - lo) * w, in place
    return out


__all__ = [
    "Coords",
    "axis_nodes",
    "cell_corners",
    "dilate",
    "gather",
    "in_closed_cells",
    "interpolate",
    "level_nodes",
    "straddling_corners_near",
    "to_voxels",
    "scatter",
    "straddling_cells",
    "uncertain_cells",
]
