"""Multi-target OSS-Net C against a 3D residual U-Net with K outputs, on hard multi-class phantoms.

``python -m ossnet_bench.multiclass [--quick] [--seeds N] [--steps N] [--jobs N]``. Two data sets,
each target scored on the written label map (``ossnet.metrics.target_scores``):

* BraTS-like (``ossnet.targets`` "brats-regions"): oedema 2, necrosis 1 and enhancing core 4,
  scored as whole tumour (wt), tumour core (tc) and enhancing tumour (et); nested regions, one
  sigmoid each;
* LiTS-like ("lits-classes"): liver 1 and tumour 2 as exclusive classes (one softmax), scored as
  liver (liver + tumour) and tumour.

Both models train for the same number of optimizer steps with the same optimizer as
``ossnet_bench.paper`` (Lookahead(RAdam), LR x0.1 at 80% of the steps) on the same cases: C with
border sampling split evenly between the targets' bands, the U-Net on whole volumes with BCE +
soft Dice per region (regions) or cross-entropy + soft Dice per class (classes). C segments by
multi-target MISE (one decoder pass shared by every target); its query count is reported next to
the count of a single-target MISE on the outermost target (wt, liver) of the same model and cases,
which is what a binary model of that target decodes.

Prints one JSON object last: ``dice_C_<target>``, ``dice_unet3d_<target>`` for wt, tc, et, liver
and tumour, ``queries_multiclass``, ``queries_binary`` (means per test case over both data sets),
their ratio, and the goals (C within 0.03 of the U-Net on every target; queries ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import numpy as np

from ossnet_bench._common import emit_result, make_parser, run_worker, serve_worker, setup_logging
from ossnet_bench.paper import FULL, FULL_SHAPES, QUICK, QUICK_SHAPES
from ossnet_bench.paper_runs import DATA_SEED, ZSCORE_MASK, _fit

log = logging.getLogger("ossnet_bench.multiclass")

DATASETS: dict[str, str] = {"brats": "brats-regions", "lits": "lits-classes"}
MODELS: tuple[str, ...] = ("C", "unet3d")
DICE_MARGIN = 0.03
QUERY_RATIO_GOAL = 1.5
LEARNED_DICE = 0.1


def _cases(plan: dict[str, Any], dataset: str) -> tuple[list[Any], list[Any], tuple[float, ...]]:
    """``(id, z-scored image, label in the source's values)`` for training and testing, and the spacing."""
    from ossnet.phantoms import phantom_dataset
    from ossnet.preprocess import zscore_channels

    cases = phantom_dataset(dataset, plan["n_train"] + plan["n_test"], shape=tuple(plan["shape"]), seed=DATA_SEED,
                            level="hard", sub_regions=True)
    normalised = [(c.case_id, zscore_channels(c.image, ZSCORE_MASK[dataset])[0], c.label) for c in cases]
    spacing = tuple(float(s) for s in np.diag(cases[0].affine)[:3])
    return normalised[: plan["n_train"]], normalised[plan["n_train"]:], spacing


def _ossnet(plan: dict[str, Any], targets: Any, train: list, test: list, rng: np.random.Generator) -> dict[str, Any]:
    from ossnet.config import AugmentConfig, SamplingConfig, model_config
    from ossnet.inference import Inferer
    from ossnet.model import build_model
    from ossnet.sampling import training_sample
    from ossnet.training import batch_to_device, train_step
    from ossnet_pipelines.data import collate_rows

    device = plan["device"]
    cfg = model_config("C", plan["preset"], volume_shape=tuple(plan["shape"]), in_channels=train[0][1].shape[0],
                       targets=targets)
    model = build_model(cfg).to(device)
    sampling = SamplingConfig(n_points=int(plan["n_points"]), border_ratio=0.5)
    augment = AugmentConfig() if plan["augment"] else AugmentConfig.off()

    def step(optimizer: Any) -> None:
        rows = [training_sample(train[i][1], train[i][2], cfg, sampling, augment, rng)
                for i in rng.integers(0, len(train), int(plan["batch"]))]
        train_step(model, batch_to_device(collate_rows(rows), device), optimizer, 0.1)

    out = _fit(plan, model, step)
    inferer = Inferer(mode="mise_lowres", chunk_points=2**14, device=device)
    results = [inferer(model, image) for _, image, _ in test]
    outer = targets.names[0]
    return {**out, "label_maps": [r.label_map for r in results], "infer_s": [r.seconds for r in results],
            "queries": [r.n_queries for r in results], "queries_binary": [r.target_queries[outer] for r in results],
            "queries_separately": [sum(r.target_queries.values()) for r in results]}


def _unet3d(plan: dict[str, Any], targets: Any, train: list, test: list, rng: np.random.Generator) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from ossnet.baselines import ResidualUNet3D
    from ossnet.inference import region_probabilities

    device = plan["device"]
    k = targets.n_outputs
    model = ResidualUNet3D(train[0][1].shape[0], k, channels=tuple(plan["unet_channels"])).to(device)
    classes = targets.kind == "classes"

    def step(optimizer: Any) -> None:
        picks = rng.integers(0, len(train), int(plan["batch"]))
        x = torch.from_numpy(np.stack([train[i][1] for i in picks]).astype(np.float32)).to(device)
        masks = torch.from_numpy(np.stack([targets.output_masks(train[i][2]) for i in picks]).astype(np.float32))
        masks = masks.to(device)  # [B, K, ...]: regions, or one channel per class
        logits = model(x)
        prob = torch.softmax(logits, dim=1) if classes else torch.sigmoid(logits)
        dims = (0, *range(2, logits.dim()))
        soft_dice = 1 - ((2 * (prob * masks).sum(dims) + 1) / (prob.sum(dims) + masks.sum(dims) + 1)).mean()
        fit = F.cross_entropy(logits, masks.argmax(dim=1)) if classes else F.binary_cross_entropy_with_logits(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        (fit + soft_dice).backward()
        optimizer.step()

    out = _fit(plan, model, step)
    model.eval()
    label_maps, seconds = [], []
    for _, image, _ in test:
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(torch.from_numpy(image)[None].to(device))[0].cpu()
        # The same decision rule as OSS-Net's (for classes: the regions' summed class probabilities).
        regions = region_probabilities(logits, targets, dim=0) >= 0.5
        label_maps.append(targets.label_map(regions.numpy()))
        seconds.append(time.perf_counter() - start)
    return {**out, "label_maps": label_maps, "infer_s": seconds}


def run_one(payload: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (data set, model, seed): per-target Dice and HD95 on every test case."""
    import torch

    from ossnet.metrics import target_scores
    from ossnet.targets import target_preset

    torch.set_num_threads(int(payload.get("threads") or 1))
    plan, dataset, model, seed = payload["plan"], payload["dataset"], payload["model"], int(payload["seed"])
    targets = target_preset(DATASETS[dataset])
    train, test, spacing = _cases(plan, dataset)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    log.info("%s %s seed %d: training %d steps", dataset, model, seed, plan["steps"])
    run: Callable[..., dict[str, Any]] = _ossnet if model == "C" else _unet3d
    out = run(plan, targets, train, test, rng)
    scores = [target_scores(m, case[2], targets, spacing) for m, case in zip(out.pop("label_maps"), test)]
    present = [targets.region_masks(case[2]).reshape(targets.n_targets, -1).any(axis=1) for case in test]
    per_target = {name: {"dice": [s[f"dice_{name}"] for s in scores], "hd95": [s[f"hd95_{name}"] for s in scores],
                         "present": [bool(p[t]) for p in present]}
                  for t, name in enumerate(targets.names)}
    log.info("%s %s seed %d: Dice %s, %.0f s training", dataset, model, seed,
             ", ".join(f"{n} {np.mean(v['dice']):.4f}" for n, v in per_target.items()), out["train_s"])
    return {"dataset": dataset, "model": model, "seed": seed, "targets": per_target, **out}


def summarise(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The result keys: per-target Dice / HD95 of each model, queries and the goals."""
    result: dict[str, Any] = {}
    for model in MODELS:
        for dataset in DATASETS:
            runs = [o for o in outcomes if o["model"] == model and o["dataset"] == dataset]
            for name in (runs[0]["targets"] if runs else ()):
                result[f"dice_{model}_{name}"] = round(float(np.mean([np.mean(o["targets"][name]["dice"]) for o in runs])), 4)
                result[f"hd95_{model}_{name}"] = round(float(np.mean([np.mean(o["targets"][name]["hd95"]) for o in runs])), 2)
                # Over the test cases whose reference holds the target: an empty case scores 1 for
                # predicting nothing, which would hide a target that is never found.
                found = [d for o in runs for d, p in zip(o["targets"][name]["dice"], o["targets"][name]["present"]) if p]
                result[f"dice_present_{model}_{name}"] = round(float(np.mean(found)), 4) if found else None
    c_runs = [o for o in outcomes if o["model"] == "C"]
    if c_runs:
        result["queries_multiclass"] = round(float(np.mean([q for o in c_runs for q in o["queries"]])), 1)
        result["queries_binary"] = round(float(np.mean([q for o in c_runs for q in o["queries_binary"]])), 1)
        result["queries_separately"] = round(float(np.mean([q for o in c_runs for q in o["queries_separately"]])), 1)
        result["queries_ratio"] = round(result["queries_multiclass"] / max(result["queries_binary"], 1.0), 3)
    names = ("wt", "tc", "et", "liver", "tumour")
    gaps = {name: result[f"dice_C_{name}"] - result[f"dice_unet3d_{name}"] for name in names
            if f"dice_C_{name}" in result and f"dice_unet3d_{name}" in result}
    result["dice_gap_C_minus_unet3d"] = {k: round(v, 4) for k, v in gaps.items()}
    # A target neither model learned (both below LEARNED_DICE on the cases that hold it) makes
    # "within 0.03" say nothing.
    result["targets_learned"] = [n for n in names if max(result.get(f"dice_present_{m}_{n}") or 0.0 for m in MODELS)
                                 >= LEARNED_DICE]
    result["goals"] = {
        "dice_within_0.03_of_unet3d_on_every_target": bool(gaps) and all(g >= -DICE_MARGIN for g in gaps.values()),
        "queries_at_most_1.5x_binary": result.get("queries_ratio", math.inf) <= QUERY_RATIO_GOAL,
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per model (default: 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the plan's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default: 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the plan's, cpu)")
    parser.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS), metavar="SET",
                        help="data sets (default: all: %(choices)s)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                        help="models (default: all: %(choices)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.worker is not None:
        return serve_worker(run_one, args.worker, log)
    if args.seeds < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds, --jobs and --steps must be >= 1")
    start = time.perf_counter()
    base = QUICK if args.quick else FULL
    base = replace(base, steps=args.steps or base.steps, device=args.device or base.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    payloads = [{"dataset": dataset, "model": model, "seed": seed, "threads": 1,
                 "plan": asdict(replace(base, dataset=dataset, shape=shapes[dataset]))}
                for dataset in args.datasets for model in args.models for seed in range(args.seeds)]
    payloads.sort(key=lambda p: (p["model"] != "unet3d", p["dataset"] != "brats"))  # slowest first
    timeout = 3600.0 if args.quick else 6 * 3600.0
    log.info("%d runs (%d at a time), %d steps each", len(payloads), args.jobs, base.steps)

    def launch(payload: dict[str, Any]) -> dict[str, Any] | None:
        outcome = run_worker("ossnet_bench.multiclass", payload, timeout=timeout)
        if not outcome.ok:
            log.warning("%s %s seed %d failed: %s", payload["dataset"], payload["model"], payload["seed"], outcome.error)
            return None
        return outcome.result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = [o for o in pool.map(launch, payloads) if o is not None]
    result = {"benchmark": "multiclass", "quick": bool(args.quick), "steps": base.steps, "seeds": args.seeds,
              "shapes": {d: list(shapes[d]) for d in DATASETS}, **summarise(outcomes),
              "failed_runs": len(payloads) - len(outcomes), "seconds_total": round(time.perf_counter() - start, 1)}
    log.info("goals: %s", result["goals"])
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
