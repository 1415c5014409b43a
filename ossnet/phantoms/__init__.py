"""Seeded synthetic cases for the quickstart, the tests and the benchmarks, at two levels.

* easy (``ossnet.phantoms.easy``): BraTS-like and LiTS-like cases whose target stands out by
  intensity. A single intensity window reaches Dice 0.9+ on them: smoke tests and speed
  benchmarks only, never evidence that a model segments.
* hard (``ossnet.phantoms.hard``): BraTS-like, head-with-skull (skull stripping) and LiTS-like
  cases where the best single-channel window, tuned per case on its own label, stays below
  Dice 0.60; quality claims are made on these (``ossnet_bench.paper``, the quickstart).

``phantom_dataset`` builds a seeded set of either level, optionally with thick slices (an
anisotropic spacing, made by averaging thin slices, so edges carry true partial volume).
``python -m ossnet.phantoms --report`` prints the trivial-baseline Dice of every set.
"""

from __future__ import annotations

import logging
from typing import Callable, cast

import numpy as np

from ossnet.phantoms._common import BRATS_MODALITIES, PhantomCase
from ossnet.phantoms.easy import brats_like, lits_like
from ossnet.phantoms.hard import brats_hard, head_hard, lits_hard

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("brats", "lits", "head")
LEVELS: tuple[str, ...] = ("easy", "hard")

Generator = Callable[..., PhantomCase]
_GENERATORS: dict[tuple[str, str], Generator] = {
    ("brats", "easy"): brats_like,
    ("lits", "easy"): lits_like,
    ("brats", "hard"): brats_hard,
    ("lits", "hard"): lits_hard,
    ("head", "hard"): head_hard,
}
_DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {"brats": (64, 64, 48), "lits": (64, 64, 64), "head": (64, 72, 80)}
_DEFAULT_SPACING: dict[str, tuple[float, float, float]] = {
    "brats": (1.0, 1.0, 1.0), "lits": (0.8, 0.8, 1.5), "head": (1.0, 1.0, 1.0),
}


def generator(kind: str, level: str = "easy") -> Generator:
    """The case generator of a kind at a level (``head`` exists only at the hard level)."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown phantom kind {kind!r}; choose from {', '.join(KINDS)}")
    if level not in LEVELS:
        raise ValueError(f"level: unknown phantom level {level!r}; choose from {', '.join(LEVELS)}")
    if (kind, level) not in _GENERATORS:
        raise ValueError(f"level: the {kind} phantom exists only at level 'hard'")
    return _GENERATORS[(kind, level)]


def thick_slices(make: Generator, shape: tuple[int, int, int], factor: int, **kwargs) -> PhantomCase:
    """A case with slices ``factor`` times thicker along Z than in-plane voxels.

    The case is generated on ``(X, Y, Z * factor)`` and every ``factor`` consecutive slices are
    averaged (the image) or voted (the label: foreground where at least half of the thin voxels
    are), as a scanner integrates a thick slice.

    Args:
        make: a generator (``brats_hard``, ...).
        shape: the returned (X, Y, Z) grid.
        factor: slice thickness over in-plane spacing (>= 1).
        kwargs: passed to ``make``; ``spacing`` is the returned (thick-slice) spacing.

    Returns:
        A case on ``shape`` whose affine has ``spacing[2]`` along Z.
    """
    if factor < 1:
        raise ValueError(f"slice_factor: must be >= 1, got {factor}")
    if factor == 1:
        return make(shape, **kwargs)
    x, y, z = shape
    spacing = tuple(kwargs.pop("spacing", (1.0, 1.0, float(factor))))
    thin = make((x, y, z * factor), spacing=(spacing[0], spacing[1], spacing[2] / factor), **kwargs)
    image = thin.image.reshape(thin.image.shape[0], x, y, z, factor).mean(axis=-1, dtype=np.float32)
    votes = thin.label.reshape(x, y, z, factor).sum(axis=-1, dtype=np.int32)
    label = (2 * votes >= factor).astype(np.uint8)
    affine = thin.affine.copy()
    affine[2, 2] = spacing[2]
    return PhantomCase(thin.case_id, image, label, affine, thin.modalities)


def phantom_dataset(
    kind: str = "brats",
    n: int = 8,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    empty_every: int = 0,
    level: str = "easy",
    slice_factor: int = 1,
    sub_regions: bool = False,
) -> list[PhantomCase]:
    """``n`` independent cases; case ``i`` is seeded from ``(seed, i)`` (independent of ``n``).

    Args:
        kind: "brats", "lits" or "head" (hard level only).
        n: number of cases.
        shape: grid; defaults to (64, 64, 48) for brats, (64, 64, 64) for lits, (64, 72, 80) for head.
        seed: dataset seed; different seeds give disjoint cases.
        empty_every: if > 0, every ``empty_every``-th case (i = k - 1, 2k - 1, ...) has an empty label.
        level: "easy" or "hard" (see the module docstring).
        slice_factor: Z slices this many times thicker than in-plane voxels (``thick_slices``);
            the spacing's Z grows by the same factor.
        sub_regions: hard brats / lits only: label in the source convention (BraTS oedema 2,
            necrosis 1, enhancing core 4; LiTS liver 1, tumour 2) instead of 0/1, for
            multi-target models (``ossnet.targets``); needs ``slice_factor`` 1.

    Returns:
        Cases with ids ``"<kind>-<seed>-<i:04d>"`` (easy) or ``"<kind>-hard-<seed>-<i:04d>"``.
    """
    make = generator(kind, level)
    extra: dict[str, bool] = {}
    if sub_regions:
        if level != "hard" or kind not in ("brats", "lits") or slice_factor != 1:
            raise ValueError("sub_regions: only for hard brats or lits phantoms with slice_factor 1")
        extra = {"regions": True} if kind == "brats" else {"classes": True}
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if empty_every < 0:
        raise ValueError(f"empty_every: must be >= 0, got {empty_every}")
    grid: tuple[int, int, int] = cast("tuple[int, int, int]", tuple(shape)) if shape is not None else _DEFAULT_SHAPES[kind]
    sx, sy, sz = _DEFAULT_SPACING[kind]
    spacing = (sx, sy, sz * slice_factor)
    prefix = kind if level == "easy" else f"{kind}-hard"
    cases = []
    for i in range(n):
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1, dtype=np.uint64)[0])
        empty = empty_every > 0 and (i + 1) % empty_every == 0
        cases.append(thick_slices(make, grid, slice_factor, seed=case_seed, empty=empty, spacing=spacing,
                                  case_id=f"{prefix}-{seed}-{i:04d}", **extra))
    logger.debug("generated %d %s/%s phantoms of shape %s", n, kind, level, grid)
    return cases


__all__ = [
    "BRATS_MODALITIES",
    "KINDS",
    "LEVELS",
    "PhantomCase",
    "brats_hard",
    "brats_like",
    "generator",
    "head_hard",
    "lits_hard",
    "lits_like",
    "phantom_dataset",
    "thick_slices",
]
