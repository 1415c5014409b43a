"""Multiresolution isosurface extraction on a voxel grid (Occupancy Networks' MISE, adapted).

The algorithm, given a point oracle ``evaluate(points (K, 3) int64) -> probabilities (K,)``:

1. Start level (stride ``S``, a power of two): the coarse nodes get values, either all
   evaluated (dense start) or evaluated only inside a seeded region, with surrogate values
   below the threshold elsewhere (low-resolution start, see ``lowres_start_values``).
2. For each stride ``h = S, S/2, ..., 2``: cells whose corners straddle the threshold (some
   ``>= t``, some ``< t``), optionally dilated, are *active*. Every node of stride ``h/2`` gets
   the trilinear interpolation of the stride-``h`` values unless it was evaluated already;
   the nodes of stride ``h/2`` inside active cells are evaluated.
3. After each level, *crack propagation*: any straddling cell with a corner that was not
   evaluated (an interpolated or surrogate value) has those corners evaluated, repeatedly,
   until every straddling cell has real corners. This follows a surface out of the refined
   region, so a boundary that the coarser level missed (a bump between coarse nodes, a
   low-resolution seed that was too small) is still traced, and the final mask boundary is
   made of evaluated voxels only.

Voxels never evaluated lie in cells whose corners agree, so their interpolated probability
lies on the same side of the threshold as the corners: the probability map is defined
everywhere and thresholding it gives the mask.

Guarantee: the coarse grid hits every structure that contains an axis-aligned cube of side
``S`` voxels (a ball of diameter about ``S * sqrt(3)``); smaller isolated structures may be
missed by the dense start, exactly as by the original MISE.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ossnet.inference import grid

logger = logging.getLogger(__name__)

Oracle = Callable[[torch.Tensor], torch.Tensor]


class MiseState:
    """Full-resolution value map and evaluated-voxel mask shared by the MISE levels.

    Attributes:
        values: ``(X, Y, Z)`` float32 probabilities (evaluated, interpolated or surrogate).
        evaluated: ``(X, Y, Z)`` bool, voxels whose value came from the model.
        level_queries: points evaluated per stride, coarsest first (propagation included).
    """

    def __init__(self, shape: Sequence[int], device: torch.device, evaluate: Oracle, threshold: float) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.device = device
        self.threshold = threshold
        self._evaluate = evaluate
        self.values = torch.zeros(self.shape, dtype=torch.float32, device=device)
        self.evaluated = torch.zeros(self.shape, dtype=torch.bool, device=device)
        self.level_queries: dict[int, int] = {}

    def evaluate_nodes(self, index: torch.Tensor, coords: grid.Coords, stride: int) -> int:
        """Evaluate the nodes with indices ``index`` ``(K, 3)`` at a level; returns ``K``."""
        n = int(index.shape[0])
        if n:
            x, y, z = grid.to_voxels(index, coords).unbind(1)
            self.values[x, y, z] = self._evaluate(torch.stack([x, y, z], dim=1))
            self.evaluated[x, y, z] = True
        self.level_queries[stride] = self.level_queries.get(stride, 0) + n
        return n

    def propagate(self, coords: grid.Coords, stride: int, max_steps: int) -> None:
        """Evaluate non-evaluated corners of straddling cells until there are none.

        The first round scans the whole level; later rounds only revisit the cells touching
        the nodes evaluated in the previous round (nothing else changed).
        """
        cells = grid.straddling_cells(grid.gather(self.values, coords), self.threshold)
        new = (grid.cell_corners(cells) & ~grid.gather(self.evaluated, coords)).nonzero()
        for _ in range(max_steps):
            if self.evaluate_nodes(new, coords, stride) == 0:
                return
            new = grid.straddling_corners_near(new, coords, self.values, self.evaluated, self.threshold)
        logger.warning("MISE crack propagation at stride %d stopped after %d rounds", stride, max_steps)


def dense_start(state: MiseState, stride: int) -> grid.Coords:
    """Evaluate every node of the coarsest level. Returns its coordinates."""
    coords = grid.level_nodes(state.shape, stride, state.device)
    full = torch.ones(tuple(c.numel() for c in coords), dtype=torch.bool, device=state.device)
    state.evaluate_nodes(full.nonzero(), coords, stride)
    return coords


def lowres_start(
    state: MiseState,
    stride: int,
    lowres_prob: torch.Tensor,
    lowres_factor: int,
    seed_threshold: float,
    safety_band: int,
) -> grid.Coords:
    """Seed the coarsest level from a low-resolution occupancy map.

    A coarse node takes the probability of the low-res cell containing it (nearest, i.e. the
    cell's max-pool semantics: "some voxel of this cell is foreground"). Nodes with
    probability ``>= seed_threshold`` are seeds; the seeds dilated by ``safety_band`` coarse
    cells are evaluated; every other node keeps the low-res probability (below the seed
    threshold, so below the decision threshold) as a surrogate.

    Args:
        lowres_prob: ``(lx, ly, lz)`` sigmoid of the low-resolution head.
        lowres_factor: full-resolution voxels per low-res cell along each axis.
    Returns:
        The coordinates of the coarsest level.
    """
    coords = grid.level_nodes(state.shape, stride, state.device)
    surrogate = lowres_prob.float()
    for axis, c in enumerate(coords):
        surrogate = surrogate.index_select(axis, (c // lowres_factor).clamp(max=lowres_prob.shape[axis] - 1))
    region = grid.dilate(surrogate >= seed_threshold, safety_band)
    grid.scatter(state.values, coords, surrogate)
    state.evaluate_nodes(region.nonzero(), coords, stride)
    return coords


def refine(
    state: MiseState,
    coords: grid.Coords,
    stride: int,
    dilation: int = 0,
    max_propagation_steps: int = 10_000,
) -> None:
    """Run the levels from ``stride`` (whose nodes all have values) down to stride 1.

    Args:
        state: the shared value map; updated in place.
        coords: node coordinates at ``stride``.
        stride: the starting stride (power of two).
        dilation: extra ring of cells, per level, refined around straddling cells.
        max_propagation_steps: safety cap on crack-propagation rounds per level.
    """
    state.propagate(coords, stride, max_propagation_steps)
    h = stride
    while h > 1:
        fine_h = h // 2
        fine = grid.level_nodes(state.shape, fine_h, state.device)
        coarse_values = grid.gather(state.values, coords)
        active = grid.dilate(grid.straddling_cells(coarse_values, state.threshold), dilation)
        done = grid.gather(state.evaluated, fine)
        filled = torch.where(done, grid.gather(state.values, fine), grid.interpolate(coarse_values, coords, fine))
        grid.scatter(state.values, fine, filled)
        state.evaluate_nodes((grid.in_closed_cells(active, coords, fine) & ~done).nonzero(), fine, fine_h)
        state.propagate(fine, fine_h, max_propagation_steps)
        coords, h = fine, fine_h


__all__ = ["MiseState", "Oracle", "dense_start", "lowres_start", "refine"]
