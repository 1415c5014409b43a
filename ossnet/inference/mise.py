"""Multiresolution isosurface extraction on a voxel grid (Occupancy Networks' MISE, adapted).

The algorithm, given a point oracle ``evaluate(points (K, 3) int64) -> probabilities (K,)``:

1. Start level (stride ``P``, a power of two): every node is evaluated (``dense_start``, or
   ``lowres_start``'s probe lattice, which also evaluates the stride-``S`` nodes of the cells the
   low-resolution head seeds, ``S <= P``).
2. For each stride ``h = P, P/2, ..., 2``: cells that are not safely on one side of the
   threshold ``t`` (``grid.uncertain_cells``: some corner's logit ``>= logit(t) - m_h`` and some
   corner's ``< logit(t) + m_h``, with the logit margin ``m_h = m * h / P``; with ``m = 0`` the
   straddling cells), optionally dilated, are *active*. Every node of stride ``h/2`` gets the trilinear interpolation of the
   stride-``h`` values unless it was evaluated already; the nodes of stride ``h/2`` inside
   active cells are evaluated.
3. After each level, *crack propagation*: any straddling cell with a corner that was not
   evaluated (an interpolated value) has those corners evaluated, repeatedly, until every
   straddling cell has real corners. This follows a surface out of the refined region, so a
   boundary that a coarser level missed is still traced, and the mask boundary is made of
   evaluated voxels only.

Voxels never evaluated lie in inactive cells, so their interpolated value lies on the same side
of the threshold as the corners: thresholding the value map gives the mask, but off the
evaluated voxels (``MiseState.evaluated``) the map is an interpolation, not the decoder's
probability.

Guarantees (``t``: threshold; ``m``: the recall margin, in logits, at the start stride ``P``):

* **Lipschitz (any head, an empty or wrong one included).** If the decoder's logit changes by
  at most ``L`` per voxel of distance, with ``L * P * sqrt(3) / 2 <= m``, the MISE mask equals
  the dense mask: every voxel of a cell of side ``h`` lies within ``h * sqrt(3) / 2`` of a
  corner, so a cell holding a voxel on the other side of ``t`` is never safe, at any level,
  down to the voxel itself. (Logits, not probabilities: a sigmoid saturates, so a probability
  margin would cover only decoders far softer than trained ones.)
* **Lattice (no assumption on the decoder).** Every component of the dense mask that contains
  a node of the start lattice (stride ``P``: any component holding a ball of radius
  ``P * sqrt(3) / 2``), or a stride-``S`` node of a seeded region, is found whole: its
  boundary is traced by crack propagation. Smaller components away from seeds are found only
  as far as the Lipschitz bound holds for them.
"""

from __future__ import annotations

import logging
import math
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
    probe_stride: int = 0,
) -> tuple[grid.Coords, int]:
    """Seed the start of MISE from a low-resolution occupancy map, with a decoder probe lattice.

    The nodes of stride ``stride`` whose low-res cell (nearest: "some voxel of this cell is
    foreground") has probability ``>= seed_threshold``, dilated by ``safety_band`` nodes, are
    evaluated. With ``probe_stride`` (a power of two ``>= stride``), every node of that coarser
    lattice is evaluated too and MISE starts there: the head only adds seeds, and what it misses
    is still found within ``ossnet.inference.mise``'s guarantees. With ``probe_stride == 0`` the
    unseeded stride-``stride`` nodes keep the low-res probability as a surrogate (below the seed
    threshold): a confidently empty head then decodes nothing.

    Args:
        lowres_prob: ``(lx, ly, lz)`` sigmoid of the low-resolution head.
        lowres_factor: full-resolution voxels per low-res cell along each axis (``>= stride``).
    Returns:
        ``(coords, start_stride)``: the coordinates of the level MISE refines from, and its stride.
    """
    coords = grid.level_nodes(state.shape, stride, state.device)
    surrogate = lowres_prob.float()
    for axis, c in enumerate(coords):
        surrogate = surrogate.index_select(axis, (c // lowres_factor).clamp(max=lowres_prob.shape[axis] - 1))
    region = grid.dilate(surrogate >= seed_threshold, safety_band)
    if not probe_stride:
        grid.scatter(state.values, coords, surrogate)
        state.evaluate_nodes(region.nonzero(), coords, stride)
        return coords, stride
    probes = dense_start(state, probe_stride)
    seeds = region & ~grid.gather(state.evaluated, coords)
    state.evaluate_nodes(seeds.nonzero(), coords, stride)
    return probes, probe_stride


def safe_bounds(threshold: float, logit_margin: float) -> tuple[float, float]:
    """Probabilities below ``low`` / from ``high`` on are safely outside / inside: the threshold
    moved by ``logit_margin`` in logit space."""
    if logit_margin <= 0:
        return threshold, threshold
    centre = math.log(threshold / (1.0 - threshold))
    return 1.0 / (1.0 + math.exp(-(centre - logit_margin))), 1.0 / (1.0 + math.exp(-(centre + logit_margin)))


def refine(
    state: MiseState,
    coords: grid.Coords,
    stride: int,
    dilation: int = 0,
    max_propagation_steps: int = 10_000,
    margin: float = 0.0,
) -> None:
    """Run the levels from ``stride`` (whose nodes all have values) down to stride 1.

    Args:
        state: the shared value map; updated in place.
        coords: node coordinates at ``stride``.
        stride: the starting stride (power of two).
        dilation: extra ring of cells, per level, refined around active cells.
        max_propagation_steps: safety cap on crack-propagation rounds per level.
        margin: recall margin in logits at ``stride`` (``m`` in the module's guarantee); a level
            of stride ``h`` refines cells within ``margin * h / stride`` logits of the threshold.
    """
    state.propagate(coords, stride, max_propagation_steps)
    h = stride
    while h > 1:
        fine_h = h // 2
        fine = grid.level_nodes(state.shape, fine_h, state.device)
        coarse_values = grid.gather(state.values, coords)
        low, high = safe_bounds(state.threshold, margin * h / stride)
        cells = grid.uncertain_cells(coarse_values, low, high)
        active = grid.dilate(cells, dilation)
        done = grid.gather(state.evaluated, fine)
        filled = torch.where(done, grid.gather(state.values, fine), grid.interpolate(coarse_values, coords, fine))
        grid.scatter(state.values, fine, filled)
        state.evaluate_nodes((grid.in_closed_cells(active, coords, fine) & ~done).nonzero(), fine, fine_h)
        state.propagate(fine, fine_h, max_propagation_steps)
        coords, h = fine, fine_h


__all__ = ["MiseState", "Oracle", "dense_start", "lowres_start", "refine"]
