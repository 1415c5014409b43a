"""Batch inference benchmark: the whole ``ossnet infer`` job (read -> MISE -> write) on BraTS-like scans.

``python -m ossnet_bench.infer [--quick] [--grid X Y Z] [--cases N] [--train-steps N] [--chunk-points N]``

1. Model: OSS-Net variant C at the BraTS preset (the paper's widths: encoder 16-32-64-128, a
   512-wide decoder, 7^3 patches through the 7^3 patch kernel) on the benchmark grid, trained
   briefly in-process on phantoms (``ossnet_bench.mise.train``: a few Adam steps with border sampling,
   then batch-norm recalibration). That gives a lesion-shaped decision surface, not a converged
   model; query counts depend on the learned surface, seconds on the network's size.
2. Cases: BraTS-like phantoms (``ossnet.phantoms.brats_like``) written as a BraTS archive (four
   NIfTI modalities and a segmentation per case), a few voxels smaller than the grid so every
   case is padded, as BraTS 240x240x155 is padded to 256x256x160.
3. Jobs (``ossnet_pipelines.infer.run_inference`` on a local Ray instance), one fresh output folder each:
   "dense", "mise" (dense start) and "mise_lowres" (low-resolution start) with 1 actor, then
   "mise_lowres" with 2 actors. Seconds per case are the report's per-case read + predict +
   write times (queueing and actor start-up excluded); cases/s is cases over the job's whole
   pipeline time (actor start-up included, as a user sees it).

Grids: on a GPU the BraTS grid 256x256x160 with 4 cases; on a CPU 128x128x80 with 2 cases.
``--quick`` uses 48x48x32 with 2 cases: the preset's decoder costs about 4 million
multiply-adds per point, so one dense pass over 128x128x80 (1.3 million points) takes about ten
minutes on one CPU core, far beyond a one-minute check.

The last stdout line is one JSON object with ``cases_per_s_1actor``, ``cases_per_s_2actors``,
``seconds_per_case_dense``, ``seconds_per_case_mise_lowres``, ``query_ratio_dense_over_lowres``
and the details (queries and seconds of every mode, agreement with dense, device, grid, training).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ossnet_bench._common import emit_result, make_parser, setup_logging

log = logging.getLogger("ossnet_bench.infer")

BRATS_GRID: tuple[int, int, int] = (256, 256, 160)
CPU_GRID: tuple[int, int, int] = (128, 128, 80)
QUICK_GRID: tuple[int, int, int] = (48, 48, 32)
MARGIN = (3, 1, 1)  # scans are this much smaller than the grid: odd sizes, padded on every axis


def _train(grid: Sequence[int], steps: int, device: torch.device, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    from ossnet_bench.mise import phantom_case, train
    from ossnet.config import model_config

    cfg = model_config("C", "brats", volume_shape=tuple(int(s) for s in grid))
    cases = [phantom_case(grid, seed + 100 + i) for i in range(3)]
    log.info("training variant C (brats preset, %s grid, %s) for %d steps", tuple(grid), device, steps)
    return train(cfg, cases, seconds=0.0, device=device, seed=seed, min_steps=steps)


def _write_cases(root: Path, grid: Sequence[int], n: int, seed: int) -> Path:
    from ossnet.phantoms import brats_like
    from ossnet_pipelines.synthetic import write_brats_archive

    shape = tuple(int(g) - m for g, m in zip(grid, MARGIN))
    cases = [brats_like(shape, seed=seed + i, case_id=f"bench-{i:03d}") for i in range(n)]  # type: ignore[arg-type]
    return write_brats_archive(cases, root / "archive")


def _job(archive: Path, out: Path, checkpoint: Path, mode: str, actors: int, chunk_points: int) -> dict[str, Any]:
    from ossnet_pipelines.infer import InferJob, run_inference

    report = run_inference(InferJob(input=str(archive), output=str(out), model=str(checkpoint), mode=mode,
                                    actors=actors, chunk_points=chunk_points, report_every_s=3600.0))
    if report.failed:
        raise RuntimeError(f"bench job {mode}: {report.failed[0].case_id}: {report.failed[0].error}")
    ok = [c for c in report.cases if c.status == "ok"]
    out_row = {
        "seconds_per_case": float(np.mean([c.seconds for c in ok])),
        "predict_seconds_per_case": float(np.mean([c.predict_seconds for c in ok])),
        "queries_per_case": float(np.mean([c.n_queries for c in ok])),
        "cases_per_s": report.cases_per_s,
        "pipeline_seconds": report.pipeline_seconds,
        "mode_ran": sorted({c.mode for c in ok}),
        "dice_vs_label": report.mean_dice,
    }
    log.info("%s, %d actor(s): %.2f s/case (%.2f s predicting), %.0f queries/case, %.3f cases/s", mode, actors,
             out_row["seconds_per_case"], out_row["predict_seconds_per_case"], out_row["queries_per_case"],
             out_row["cases_per_s"])
    return out_row


def _agreement(out_a: Path, out_b: Path) -> float:
    """Mean Dice between the masks two jobs wrote."""
    import nibabel as nib

    from ossnet.metrics import dice

    def mask(path: Path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj) > 0

    scores = [dice(mask(p), mask(out_b / "masks" / p.name)) for p in sorted((out_a / "masks").glob("*.nii.gz"))]
    return float(np.mean(scores)) if scores else math.nan


def _start_ray(attempts: int = 3) -> None:
    """A local Ray instance; retried, since a raylet on a saturated host can miss Ray's 30 s start limit."""
    import ray
    import ray.data

    for attempt in range(1, attempts + 1):
        try:
            # Logical CPUs beyond the cores: two actors plus the read/write tasks must fit.
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, configure_logging=False)
            break
        except Exception as exc:  # Ray raises a bare Exception for the start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("Ray did not start (%s); retrying", exc)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run(grid: Sequence[int], n_cases: int, train_steps: int, chunk_points: int, seed: int) -> dict[str, Any]:
    import ray

    from ossnet.checkpoint import PreprocessSpec, save_checkpoint
    from ossnet.phantoms import BRATS_MODALITIES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, summary = _train(grid, train_steps, device, seed)
    with tempfile.TemporaryDirectory(prefix="ossnet-bench-infer-") as tmp:
        root = Path(tmp)
        checkpoint = save_checkpoint(root / "model.pt", model.cpu(),
                                     PreprocessSpec(modalities=tuple(BRATS_MODALITIES), volume_shape=tuple(grid)))
        archive = _write_cases(root, grid, n_cases, seed)
        started = not ray.is_initialized()
        if started:
            _start_ray()
        try:
            jobs = {}
            for mode in ("dense", "mise", "mise_lowres"):
                jobs[mode] = _job(archive, root / mode, checkpoint, mode, 1, chunk_points)
            jobs["mise_lowres_2"] = _job(archive, root / "mise_lowres_2", checkpoint, "mise_lowres", 2, chunk_points)
            agreement = {m: _agreement(root / m, root / "dense") for m in ("mise", "mise_lowres")}
        finally:
            if started:
                ray.shutdown()
    dense, mise, low, low2 = jobs["dense"], jobs["mise"], jobs["mise_lowres"], jobs["mise_lowres_2"]
    return {
        "grid": list(grid),
        "scan_shape": [int(g) - m for g, m in zip(grid, MARGIN)],
        "cases": n_cases,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "chunk_points": chunk_points,
        "queries_per_case_dense": dense["queries_per_case"],
        "queries_per_case_mise": mise["queries_per_case"],
        "queries_per_case_mise_lowres": low["queries_per_case"],
        "seconds_per_case_mise": round(mise["seconds_per_case"], 3),
        "predict_seconds_per_case": {m: round(j["predict_seconds_per_case"], 3) for m, j in jobs.items()},
        "agreement_dice_vs_dense": {m: round(v, 5) for m, v in agreement.items()},
        "dice_vs_label_mise_lowres": round(low["dice_vs_label"], 4),
        "pipeline_seconds": {m: round(j["pipeline_seconds"], 2) for m, j in jobs.items()},
        **summary,
        "cases_per_s_1actor": round(low["cases_per_s"], 4),
        "cases_per_s_2actors": round(low2["cases_per_s"], 4),
        "seconds_per_case_dense": round(dense["seconds_per_case"], 3),
        "seconds_per_case_mise_lowres": round(low["seconds_per_case"], 3),
        "query_ratio_dense_over_lowres": round(dense["queries_per_case"] / max(low["queries_per_case"], 1.0), 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="model grid (default: 256x256x160 on a GPU, 128x128x80 on a CPU, 48x48x32 with --quick)")
    parser.add_argument("--cases", type=int, default=None, help="cases per job (default: 2; 4 on a GPU)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default: 4 quick, 30 full)")
    parser.add_argument("--chunk-points", type=int, default=2**14, help="points per decoder pass (default: 16384)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    cuda = torch.cuda.is_available()
    grid = tuple(args.grid) if args.grid else (QUICK_GRID if args.quick else (BRATS_GRID if cuda else CPU_GRID))
    n_cases = args.cases if args.cases is not None else (4 if cuda and not args.quick else 2)
    steps = args.train_steps if args.train_steps is not None else (4 if args.quick else 30)
    if n_cases < 1 or steps < 1 or any(g < 16 for g in grid):
        parser.error("--cases and --train-steps must be >= 1 and every grid size >= 16")
    t0 = time.perf_counter()
    result = run(grid, n_cases, steps, args.chunk_points, args.seed)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    emit_result(result)


if __name__ == "__main__":
    main()
