"""Training throughput of the Ray Train job: points/s and volumes/s with 1 and 2 workers.

``python -m ossnet_bench.train [--quick]``. Seeded BraTS-like phantoms are ingested into a store (quick:
the "tiny" preset, 32x32x24; full: "small", 64x64x48), then ``ossnet_pipelines.train.train`` runs the
real job (Ray Data sampling tasks -> TorchTrainer workers, DDP with 2, no MLflow) for a few
epochs in a fresh local Ray instance per configuration (its own subprocess). The first epoch
warms up the worker processes and is left out. Per configuration the result gives:

- ``points_per_s_<k>w`` / ``volumes_per_s_<k>w``: training points (volumes x points per volume)
  and volumes per second of epoch wall time (slowest rank), all workers together;
- ``data_wait_fraction_<k>w``: the fraction of epoch time a worker spent waiting for its next
  batch from the Ray Data stream (rank mean); ``data_wait_fraction`` is the 1-worker figure.

The global batch is the same for both configurations (DDP splits it), so 2 workers run the same
optimisation with half the volumes each. When CUDA is available the same is measured on the GPU
with one worker (two with two devices). Logical Ray CPUs: workers x 1 + 2 for the data tasks.
On a shared machine the absolute figures move with the load; the ratios measured side by side
are the informative part. The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ossnet_bench._common import emit_result, make_parser, run_worker, setup_logging

log = logging.getLogger("ossnet_bench.train")

SEED = 0
# name: (preset, source grid, cases, samples per case, points, global batch, epochs incl. warm-up)
SIZES: dict[str, tuple[str, tuple[int, int, int], int, int, int, int, int]] = {
    "quick": ("tiny", (37, 41, 29), 6, 2, 2048, 4, 3),
    "full": ("small", (70, 66, 50), 10, 2, 8192, 4, 4),
}


def _job(payload: dict[str, Any]) -> Any:
    from ossnet_pipelines.jobconfig import load_job
    from ossnet_pipelines.train import TrainJob

    epochs = int(payload["epochs"])
    overrides = {
        "store": payload["store"], "model.preset": payload["preset"], "sampling.n_points": payload["points"],
        "train.epochs": epochs, "train.batch_size": payload["batch"],
        "train.samples_per_case": payload["samples_per_case"], "train.validate_every": epochs,
        "train.checkpoint_every": epochs, "validation.max_cases": 1, "validation.png_cases": 0,
        "data.object_store_mb": 512, "scaling.num_workers": payload["workers"],
        "scaling.use_gpu": payload["gpu"], "scaling.resources_per_worker": {"CPU": 1, **({"GPU": 1} if payload["gpu"] else {})},
        "scaling.max_failures": 0, "run.name": f"bench-{payload['workers']}w-{'gpu' if payload['gpu'] else 'cpu'}",
        "run.storage_path": payload["storage"], "tracking.enabled": False,
    }
    return load_job(TrainJob, None, list(overrides.items()))


def train_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh private Ray instance (this subprocess)."""
    import ray

    from ossnet_pipelines.train import train

    temp_dir = tempfile.mkdtemp(prefix="ossnet-bt-", dir="/tmp")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=int(payload["workers"]) + 2, object_store_memory=768 << 20,
             include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=temp_dir)
    try:
        start = time.perf_counter()
        result = train(_job(payload))
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    timed = [m for m in result.history if m["epoch"] > 1] or list(result.history)

    def mean(key: str) -> float:
        return sum(m[key] for m in timed) / len(timed)

    return {
        "points_per_s": mean("points_per_s"), "volumes_per_s": mean("volumes_per_s"),
        "data_wait_fraction": mean("data_wait_fraction"), "epoch_seconds": mean("epoch_seconds"),
        "volumes_per_epoch": mean("train_volumes"), "timed_epochs": len(timed), "job_wall_s": wall,
        "world_size": result.extra.get("world_size"),
    }


def _measure(base: dict[str, Any], workers: int, gpu: bool) -> dict[str, Any]:
    payload = {**base, "workers": workers, "gpu": gpu}
    out = run_worker("ossnet_bench.train", payload, timeout=3600)
    if not out.ok:
        raise RuntimeError(f"ossnet_bench.train: {workers} worker(s){' on GPU' if gpu else ''}: {out.error}")
    r = out.result
    log.info("%d worker(s)%s: %.0f points/s, %.2f volumes/s, data wait %.0f%% (epoch %.1f s)", workers,
             " GPU" if gpu else " CPU", r["points_per_s"], r["volumes_per_s"], 100 * r["data_wait_fraction"],
             r["epoch_seconds"])
    return r


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    import torch

    from ossnet_bench.data import write_brats_archive
    from ossnet.phantoms import brats_like
    from ossnet_pipelines.ingest import IngestJob, ingest

    name = "quick" if quick else "full"
    preset, grid, n_cases, spc, points, batch, epochs = SIZES[name]
    cases = [brats_like(grid, seed=SEED + i, case_id=f"bench-{i:03d}") for i in range(n_cases)]
    store = str(workdir / "store.zarr")
    report = ingest(IngestJob(source=str(write_brats_archive(cases, workdir / "archive")), store=store,
                              preset=preset, val_fraction=1.0 / n_cases, executor="serial"))
    if not report.ok:
        raise RuntimeError(f"ossnet_bench.train: ingest failed:\n{report.table()}")
    base = {"store": store, "preset": preset, "points": points, "batch": batch, "samples_per_case": spc,
            "epochs": epochs, "storage": str(workdir / "ray_results")}
    log.info("%s: %s preset, %d cases x %d samples, %d points, global batch %d, %d epochs (1 warm-up)",
             name, preset, n_cases, spc, points, batch, epochs)
    one = _measure(base, 1, gpu=False)
    two = _measure(base, 2, gpu=False)
    result: dict[str, Any] = {
        "mode": name, "preset": preset, "n_points": points, "global_batch": batch,
        "volumes_per_epoch": one["volumes_per_epoch"],
        "points_per_s_1w": round(one["points_per_s"], 1), "points_per_s_2w": round(two["points_per_s"], 1),
        "volumes_per_s_1w": round(one["volumes_per_s"], 3), "volumes_per_s_2w": round(two["volumes_per_s"], 3),
        "data_wait_fraction_1w": round(one["data_wait_fraction"], 3),
        "data_wait_fraction_2w": round(two["data_wait_fraction"], 3),
        "scaling_2w_over_1w": round(two["points_per_s"] / one["points_per_s"], 2),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        gpu_base = {**base, "points": 2**14 if not quick else 4096}
        g1 = _measure(gpu_base, 1, gpu=True)
        result.update(gpu_n_points=gpu_base["points"], points_per_s_gpu_1w=round(g1["points_per_s"], 1),
                      volumes_per_s_gpu_1w=round(g1["volumes_per_s"], 3),
                      data_wait_fraction_gpu_1w=round(g1["data_wait_fraction"], 3))
        if torch.cuda.device_count() >= 2:
            g2 = _measure(gpu_base, 2, gpu=True)
            result.update(points_per_s_gpu_2w=round(g2["points_per_s"], 1),
                          volumes_per_s_gpu_2w=round(g2["volumes_per_s"], 3),
                          data_wait_fraction_gpu_2w=round(g2["data_wait_fraction"], 3))
    result["data_wait_fraction"] = result["data_wait_fraction_1w"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser: argparse.ArgumentParser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="keep the archive, store and checkpoints here (default: a temporary folder)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.worker:
        emit_result(train_worker(json.loads(args.worker)))
        return 0
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        emit_result(run(args.quick, workdir))
        return 0
    with tempfile.TemporaryDirectory(prefix="ossnet-bench-train-") as tmp:
        emit_result(run(args.quick, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
