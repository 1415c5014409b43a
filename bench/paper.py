"""The paper's Table 1 (segmentation) and Table 3 (sampling) on the hard phantoms, with the
baselines users compare against.

``python -m ossnet_bench.paper [--quick] [--dataset brats|lits|head] [--seeds N] [--steps N] [--jobs N]``

Models: OSS-Net O-Net, A, B, C, D (uniform sampling) and C with border sampling (Table 3); the 3D
residual U-Net on whole volumes (the paper's baseline); the same U-Net trained on random crops
and applied by a Gaussian-blended sliding window (how nnU-Net and MONAI users train at high
resolution), its crop chosen so that one training step needs no more memory than OSS-Net C's;
the slice-wise 2D residual U-Net; and the trivial baseline, the best single-channel intensity
window tuned per test case on its own label (an upper bound of any threshold).

Budget: every model trains for the same number of optimizer steps (not the same wall time) on
the same cases, with the same optimizer, LR schedule and seeds; ``ossnet_bench.paper_runs`` has the
details. Each (model, seed) runs in a fresh process; ``--jobs`` of them at a time (one thread
each). Scores are on the dense full-resolution test volumes: Dice and IoU, HD95 in mm (a
prediction that misses a case entirely scores the grid diagonal); ``dice_std`` is the standard
deviation over seeds of the mean test Dice. Training memory is the peak RSS of the training
loop above the process's RSS before it (the kernel's high-water mark, as in ``ossnet_bench.memory``);
inference seconds and decoder queries are per test case.

``--quick`` (at most 15 minutes on 2 CPUs): hard LiTS-like CT phantoms at 48^3 (12 training and
4 test cases; ``--dataset brats`` uses 64x64x48, ``head`` 48x56x64), 300 steps of 2 volumes (2048
points each for OSS-Net; 8 slices for the 2D U-Net), the "small" OSS-Net preset and U-Nets of half the
paper's width (8-128 channels), no
augmentation, 3 seeds. The full run is sized for one GPU: hard BraTS-like phantoms at
128x128x80 (48 + 12 cases), 4000 steps of 4 volumes with 2**14 points, the paper's model sizes
and augmentation, the 2D U-Net on all three axes (the best one reported, as in the paper).

Output: progress on stderr, ``bench/results/paper.md`` (the table and the goals) and
``paper.png`` (test Dice against training memory, error bars over seeds), and one JSON object
as the last stdout line with ``dice_<m>``, ``dice_std_<m>``, ``iou_<m>``, ``hd95_<m>``,
``train_mb_<m>``, ``infer_s_<m>``, ``queries_<m>`` for ``<m>`` in onet, A, B, C, D, unet3d,
unet2d, unet3d_patch, plus ``dice_C_border`` (and its other figures), ``trivial_dice`` and
``goals``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ossnet_bench._common import emit_result, make_parser, run_worker, serve_worker, setup_logging

log = logging.getLogger("ossnet_bench.paper")

MODELS: tuple[str, ...] = ("onet", "A", "B", "C", "D", "unet3d", "unet2d", "unet3d_patch")
RUNS: tuple[str, ...] = MODELS + ("C_border",)
LABELS = {
    "onet": "O-Net", "A": "OSS-Net A", "B": "OSS-Net B", "C": "OSS-Net C", "D": "OSS-Net D",
    "C_border": "OSS-Net C, border sampling", "unet3d": "3D U-Net, whole volume",
    "unet3d_patch": "3D U-Net, crops + sliding window", "unet2d": "2D U-Net, slice-wise",
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """What every run of one benchmark trains on and how long (see the module docstring)."""

    dataset: str
    shape: tuple[int, int, int]
    n_train: int
    n_test: int
    steps: int
    batch: int
    n_points: int
    preset: str
    unet_channels: tuple[int, ...]
    slice_batch: int
    augment: bool
    lr: float
    axes: tuple[int, ...]
    device: str = "cpu"
    crop: int = 0  # set by the calibration
    axis: int = 2  # set per 2D run


QUICK = Plan(dataset="lits", shape=(48, 48, 48), n_train=12, n_test=4, steps=300, batch=2, n_points=2048,
             preset="small", unet_channels=(8, 16, 32, 64, 128), slice_batch=8, augment=False, lr=1e-3, axes=(2,))
FULL = Plan(dataset="brats", shape=(128, 128, 80), n_train=48, n_test=12, steps=4000, batch=4, n_points=2**14,
            preset="brats", unet_channels=(16, 32, 64, 128, 256), slice_batch=32, augment=True, lr=3e-4,
            axes=(0, 1, 2))
# Grids per data set: quick (small enough for the CPU budget, large enough for the targets) and full.
QUICK_SHAPES = {"brats": (64, 64, 48), "lits": (48, 48, 48), "head": (48, 56, 64)}
FULL_SHAPES = {"brats": (128, 128, 80), "lits": (128, 128, 128), "head": (128, 144, 160)}


# --------------------------------------------------------------------------- calibration


def calibrate_crop(plan: Plan, timeout: float) -> tuple[int, dict[str, Any]]:
    """The crop side at which a U-Net training step needs about OSS-Net C's step memory.

    One training step of C and of the U-Net at two small crops are measured in fresh processes
    (``ossnet_bench.memory``'s workers), the U-Net's memory is fitted as affine in the voxel count, and
    the largest crop (a multiple of 16) within C's figure is measured to confirm.
    """
    from ossnet_bench.memory import UNetScaling, matching_crop, measure_peak

    channels = 4 if plan.dataset == "brats" else 1
    unet = dict(in_channels=channels, channels=list(plan.unet_channels), batch_size=plan.batch)
    c = measure_peak("ossnet", plan.shape, plan.device, plan.n_points, timeout, 1, preset=plan.preset,
                 in_channels=channels, batch_size=plan.batch)
    if not c["ok"]:
        raise RuntimeError(f"calibration: OSS-Net C step failed: {c['error']}")
    scaling = UNetScaling()
    table: dict[str, Any] = {"ossnet_C_step_mb": round(c["peak_mb"], 1)}
    for side in (16, 32):
        res = measure_peak("unet3d", (side,) * 3, plan.device, plan.n_points, timeout, 1, **unet)
        if res["ok"]:
            scaling.add((side,) * 3, res["peak_mb"], res["seconds"])
            table[f"unet3d_step_mb_crop{side}"] = round(res["peak_mb"], 1)
    side = matching_crop(c["peak_mb"], scaling, min(plan.shape))
    res = measure_peak("unet3d", (side,) * 3, plan.device, plan.n_points, timeout, 1, **unet)
    table.update(crop=side, unet3d_step_mb_crop=round(res.get("peak_mb") or math.nan, 1))
    log.info("crop-trained U-Net: crop %d^3 (step %.0f MiB vs OSS-Net C %.0f MiB)", side,
             res.get("peak_mb") or math.nan, c["peak_mb"])
    return side, table


# --------------------------------------------------------------------------- aggregation


def _trivial(plan: Plan) -> dict[str, float]:
    """The best intensity window per test case (tuned on its own label)."""
    from ossnet_bench.paper_runs import load_cases
    from ossnet.baselines.window import apply_window, best_window
    from ossnet.metrics import hd95

    _, test, spacing = load_cases(asdict(plan))
    diagonal = float(np.linalg.norm(np.asarray(plan.shape) * np.asarray(spacing)))
    fits = [best_window(c.image, c.label) for c in test]
    return {
        "dice": float(np.mean([f.dice for f in fits])),
        "hd95": float(np.mean([hd95(apply_window(c.image, f), c.label, spacing, diagonal) for c, f in zip(test, fits)])),
    }


def summarise(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per run name: mean over seeds (and cases) of every figure, Dice std over seeds."""
    out: dict[str, Any] = {}
    by_run: dict[str, list[dict[str, Any]]] = {}
    for o in outcomes:
        by_run.setdefault(o["run"], []).append(o)
    for run, results in by_run.items():
        if run.startswith("unet2d_axis"):
            continue
        per_seed = [float(np.mean(r["dice"])) for r in results]
        out[run] = {
            "dice": float(np.mean(per_seed)),
            "dice_std": float(np.std(per_seed)),
            "iou": float(np.mean([np.mean(r["iou"]) for r in results])),
            "hd95": float(np.mean([np.mean(r["hd95"]) for r in results])),
            "train_mb": float(np.mean([r["train_mb"] for r in results])),
            "train_s": float(np.mean([r["train_s"] for r in results])),
            "infer_s": float(np.mean([np.mean(r["infer_s"]) for r in results])),
            "queries": float(np.mean([np.mean(r["queries"]) for r in results])),
            "params": int(results[0]["params"]),
            "seeds": len(results),
        }
    return out


def goals(table: dict[str, Any], trivial: float) -> dict[str, bool]:
    """The issue's goals for the quick run (None-safe: a missing model fails its goal)."""
    def d(m: str) -> float:
        return table.get(m, {}).get("dice", -math.inf)

    return {
        "C_at_least_0.80": d("C") >= 0.80,
        "C_at_least_trivial_plus_0.20": d("C") >= trivial + 0.20,
        "C_at_least_A_minus_0.01": d("C") >= d("A") - 0.01,
        "variants_at_least_onet_plus_0.10": all(d(m) >= d("onet") + 0.10 for m in ("A", "B", "C", "D")),
        "C_within_0.02_of_unet3d": d("C") >= d("unet3d") - 0.02,
        "C_within_0.02_of_unet3d_patch": d("C") >= d("unet3d_patch") - 0.02,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(plan: Plan, table: dict[str, Any], trivial: dict[str, float], met: dict[str, bool],
                 calibration: dict[str, Any], out_dir: Path, command: str, seconds: float) -> tuple[Path, Path]:
    """``paper.md`` (table, goals, setup) and ``paper.png`` (Dice against training memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["| model | test Dice (mean ± std over seeds) | IoU | HD95 (mm) | training memory (MiB) | "
            "training s | inference s / case | decoder queries / case | parameters |",
            "|---|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        r = table.get(run)
        if r is None:
            continue
        rows.append(f"| {LABELS[run]} | {r['dice']:.3f} ± {r['dice_std']:.3f} | {r['iou']:.3f} | {r['hd95']:.2f} | "
                    f"{r['train_mb']:.0f} | {r['train_s']:.0f} | {r['infer_s']:.2f} | {r['queries']:.0f} | "
                    f"{r['params'] / 1e6:.2f}M |")
    rows.append(f"| intensity window, tuned per test case (trivial) | {trivial['dice']:.3f} | - | "
                f"{trivial['hd95']:.2f} | - | - | - | - | - |")
    grid = "x".join(map(str, plan.shape))
    text = [
        "# OSS-Net against its baselines on hard phantoms (ossnet_bench.paper)",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min). Data: hard {plan.dataset}-like phantoms "
        f"(no intensity window solves them), {grid} voxels, {plan.n_train} training and {plan.n_test} test cases. "
        f"Budget: {plan.steps} optimizer steps for every model ({plan.batch} volumes or crops per step; "
        f"{plan.slice_batch} slices for the 2D U-Net), Lookahead(RAdam) lr {plan.lr:g} dropped x0.1 at 80%, "
        f"{'the paper augmentation' if plan.augment else 'no augmentation'}, "
        f"{table.get('C', {}).get('seeds', 0)} seeds. OSS-Net preset `{plan.preset}` with {plan.n_points} points per "
        f"volume; U-Net channels {'-'.join(map(str, plan.unet_channels))}; the crop-trained U-Net uses "
        f"{calibration.get('crop')}^3 crops (one step: {calibration.get('unet3d_step_mb_crop')} MiB against OSS-Net "
        f"C's {calibration.get('ossnet_C_step_mb')} MiB). Scores on the dense full-resolution test volumes.",
        "",
        *rows,
        "",
        "Goals (quick mode):",
        "",
        *[f"- {name.replace('_', ' ')}: {'met' if ok else 'NOT met'}" for name, ok in met.items()],
        "",
        "Training memory is the peak RSS of each run's training loop above the process's RSS before it "
        "(data sampling included); inference seconds are per test case on one CPU thread.",
        "",
    ]
    md = out_dir / "paper.md"
    md.write_text("\n".join(text))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in RUNS:
        r = table.get(run)
        if r is None:
            continue
        marker = "o" if run in ("onet", "A", "B", "C", "D", "C_border") else "s"
        ax.errorbar(r["train_mb"], r["dice"], yerr=r["dice_std"], fmt=marker, capsize=3, label=LABELS[run])
    ax.axhline(trivial["dice"], color="grey", linestyle="--", label="intensity window (trivial)")
    ax.set_xscale("log")
    ax.set_xlabel("peak training memory (MiB, log scale)")
    ax.set_ylabel("test Dice")
    ax.set_title(f"hard {plan.dataset}-like phantoms, {grid}, {plan.steps} steps each")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = out_dir / "paper.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md, png


# --------------------------------------------------------------------------- driver


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.dataset and args.dataset != plan.dataset:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
        plan = replace(plan, dataset=args.dataset, shape=shapes[args.dataset])
    if args.shape:
        plan = replace(plan, shape=tuple(args.shape))
    if args.steps:
        plan = replace(plan, steps=args.steps)
    if args.device:
        plan = replace(plan, device=args.device)
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.description = ("Table 1 and 3 of the paper on hard phantoms: OSS-Net O-Net/A/B/C/D, C with border "
                          "sampling, the 3D U-Net (whole volume and crop-trained), the 2D U-Net and the "
                          "intensity-window baseline, trained for the same number of steps with 3 seeds.")
    parser.add_argument("--dataset", choices=("brats", "lits", "head"), default=None,
                        help="hard phantom set (default: lits with --quick, brats otherwise)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per model (default: 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the plan's)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="grid override")
    parser.add_argument("--models", nargs="+", choices=RUNS, default=list(RUNS), metavar="MODEL",
                        help="models to run (default: all: %(choices)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where runs train and infer (default: cpu; the full run is sized for one GPU)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time, one CPU thread each (default: 2; use 1 on one GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for paper.md and paper.png")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.worker is not None:
        from ossnet_bench.paper_runs import run_one

        return serve_worker(run_one, args.worker, log)  # the driver records a failure and goes on
    if args.seeds < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds, --jobs and --steps must be >= 1")

    start = time.perf_counter()
    plan = build_plan(args)
    timeout = 3600.0 if args.quick else 6 * 3600.0
    calibration: dict[str, Any] = {}
    if "unet3d_patch" in args.models:
        crop, calibration = calibrate_crop(plan, timeout)
        plan = replace(plan, crop=crop)
    payloads = []
    for run in args.models:
        for axis in (plan.axes if run == "unet2d" else (plan.axis,)):
            for seed in range(args.seeds):
                payloads.append({"run": run, "seed": seed, "threads": 1, "plan": asdict(replace(plan, axis=axis))})
    # Slowest first, so the pool does not end on one long run.
    order = {"unet3d": 0, "unet3d_patch": 1, "D": 2, "B": 3, "unet2d": 4}
    payloads.sort(key=lambda p: order.get(p["run"], 9))
    log.info("%d runs (%d at a time): %s on hard %s phantoms %s, %d steps", len(payloads), args.jobs,
             ", ".join(args.models), plan.dataset, "x".join(map(str, plan.shape)), plan.steps)

    def launch(payload: dict[str, Any]) -> dict[str, Any] | None:
        outcome = run_worker("ossnet_bench.paper", payload, timeout=timeout)
        if not outcome.ok:
            log.warning("%s seed %d failed: %s", payload["run"], payload["seed"], outcome.error)
            return None
        result = outcome.result
        if result["run"] == "unet2d" and len(plan.axes) > 1:
            result["run"] = f"unet2d_axis{result['axis']}"
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = [o for o in pool.map(launch, payloads) if o is not None]
    axis_scores: dict[str, list[float]] = {}
    for o in outcomes:
        if o["run"].startswith("unet2d_axis"):
            axis_scores.setdefault(o["run"], []).append(float(np.mean(o["dice"])))
    if axis_scores:  # the 2D U-Net's best slicing axis by mean test Dice, as the paper reports
        best = max(axis_scores, key=lambda k: np.mean(axis_scores[k]))
        outcomes = [{**o, "run": "unet2d"} if o["run"] == best else o for o in outcomes]
        calibration["unet2d_axis"] = int(best.removeprefix("unet2d_axis"))
    table = summarise(outcomes)
    trivial = _trivial(plan)
    met = goals(table, trivial["dice"])
    seconds = time.perf_counter() - start
    command = "python -m ossnet_bench.paper" + (" --quick" if args.quick else "") + (
        f" --dataset {args.dataset}" if args.dataset else "")
    md, png = write_report(plan, table, trivial, met, calibration, args.out, command, seconds)
    result: dict[str, Any] = {"benchmark": "paper", "quick": bool(args.quick), "dataset": plan.dataset,
                              "shape": list(plan.shape), "steps": plan.steps, "seeds": args.seeds}
    for run in RUNS:
        r = table.get(run, {})
        key = "C_border" if run == "C_border" else run
        for figure in ("dice", "dice_std", "iou", "hd95", "train_mb", "infer_s", "queries"):
            result[f"{figure}_{key}"] = None if not r else round(r[figure], 4 if "dice" in figure or figure == "iou" else 2)
    result.update(trivial_dice=round(trivial["dice"], 4), trivial_hd95=round(trivial["hd95"], 2),
                  crop=calibration.get("crop"), calibration=calibration, goals=met,
                  report=_shown(md), plot=_shown(png), seconds_total=round(seconds, 1))
    log.info("C %.4f, 3D U-Net %.4f, crop U-Net %.4f, trivial %.4f; goals met: %d of %d (%s)",
             table.get("C", {}).get("dice", math.nan), table.get("unet3d", {}).get("dice", math.nan),
             table.get("unet3d_patch", {}).get("dice", math.nan), trivial["dice"], sum(met.values()), len(met), md)
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
