"""``python -m ossnet.phantoms --report``: the trivial-baseline Dice of every phantom set.

For each set (kind, level, grid, slice thickness) it generates seeded cases and prints the Dice
of the best single-channel intensity window tuned per case on its own label
(``ossnet.baselines.window.best_window``): the bar a model must clear on that set. The hard
sets are built to keep it below 0.60; the easy ones do not (they are smoke-test data).
The last stdout line is one JSON object, ``{"<set>": {"mean": ..., "min": ..., "max": ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple, Sequence

import numpy as np

from ossnet.baselines.window import best_window
from ossnet.phantoms import phantom_dataset


class PhantomSet(NamedTuple):
    """One reported set: ``phantom_dataset(kind, shape=shape, level=level, slice_factor=factor)``."""

    name: str
    kind: str
    level: str
    shape: tuple[int, int, int]
    slice_factor: int = 1


SETS: tuple[PhantomSet, ...] = (
    PhantomSet("brats-easy", "brats", "easy", (96, 96, 64)),
    PhantomSet("brats-hard", "brats", "hard", (96, 96, 64)),
    PhantomSet("brats-hard-3mm", "brats", "hard", (96, 96, 22), 3),
    PhantomSet("head-hard", "head", "hard", (64, 72, 80)),
    PhantomSet("head-hard-3mm", "head", "hard", (64, 72, 27), 3),
    PhantomSet("lits-easy", "lits", "easy", (64, 64, 64)),
    PhantomSet("lits-hard", "lits", "hard", (64, 64, 64)),
    PhantomSet("lits-hard-4.5mm", "lits", "hard", (64, 64, 22), 3),
)


def window_report(sets: Sequence[PhantomSet], n_cases: int, seed: int) -> dict[str, dict[str, float]]:
    """Per set: mean, min and max over cases of the best-window Dice, plus the cases' seconds."""
    out: dict[str, dict[str, float]] = {}
    for s in sets:
        start = time.perf_counter()
        cases = phantom_dataset(s.kind, n_cases, shape=s.shape, seed=seed, level=s.level, slice_factor=s.slice_factor)
        scores = [best_window(case.image, case.label).dice for case in cases if case.label.any()]
        out[s.name] = {
            "mean": float(np.mean(scores)),
            "min": float(np.min(scores)),
            "max": float(np.max(scores)),
            "cases": float(len(scores)),
            "foreground": float(np.mean([case.label.mean() for case in cases])),
            "spacing_z": float(cases[0].affine[2, 2]),
            "seconds": time.perf_counter() - start,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ossnet.phantoms",
        description="Print the trivial-baseline Dice (best single-channel intensity window, tuned per case "
        "on its own label) of every phantom set. The hard sets stay below 0.60 by construction.",
        allow_abbrev=False,
    )
    parser.add_argument("--report", action="store_true", required=True, help="print the trivial-baseline table")
    parser.add_argument("--cases", type=int, default=5, help="cases per set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    parser.add_argument("--sets", nargs="+", choices=[s.name for s in SETS], default=[s.name for s in SETS],
                        metavar="SET", help="sets to report (default: all: %(choices)s)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases: must be >= 1, got {args.cases}")
    chosen = [s for s in SETS if s.name in args.sets]
    report = window_report(chosen, args.cases, args.seed)
    print(f"Best single-channel intensity window per case (Dice vs the label), {args.cases} cases per set, "
          f"seed {args.seed}")
    print("| set | level | grid | z spacing | foreground | window Dice mean | min | max |")
    print("|---|---|---|---|---|---|---|---|")
    for s in chosen:
        r = report[s.name]
        grid = "x".join(map(str, s.shape))
        print(f"| {s.name} | {s.level} | {grid} | {r['spacing_z']:g} mm | {100 * r['foreground']:.1f}% | "
              f"{r['mean']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
    sys.stdout.write(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in report.items()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
