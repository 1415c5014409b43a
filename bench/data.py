"""Training-data throughput: a reference-style NIfTI loader against the Ray streaming sampler.

``python -m ossnet_bench.data [--quick]``. The same synthetic BraTS-like cases (``brats_like``; full:
256x256x160, quick: 128x128x80 and fewer cases) are written as a BraTS 2020 archive (four int16
``.nii.gz`` modalities + seg per case) and ingested into a store by the real ingest. Every row
is what training uses: 2^14 points (half from the border band), 7^3 patches, augmentation on,
variant C at the preset grid. Measured, in samples (rows) per second:

(a) ``baseline``: the reference code's loader, one process: every step reads the four
    modalities and the seg with nibabel, brings them onto the grid (the project's scan-to-grid
    path, ``ossnet_pipelines.volumes``: RAS, z-score, crop/pad, binarise), computes the border band on
    the fly, then draws the row with the same ``training_sample``;
(b) ``ray_1cpu`` / (c) ``ray_2cpu``: ``ossnet_pipelines.data.build_training_dataset`` consumed with
    ``iter_torch_batches`` in a fresh Ray instance started with 1, then 2, CPUs (each in its own
    subprocess pinned to that many cores, so the consuming loop shares them, after a warm-up
    epoch that starts the workers).

It also weighs moving patch extraction into the training worker: the pipeline variant ships
the augmented full-resolution image (float16) and the voxel indices instead of the patches, and
the consuming process extracts them (``patch_extract_in_worker_s_per_row``, torch on the CPU;
``patches_in_worker_effective_samples_per_s`` combines both). The patches of a row take
``n * C * 343 * 4`` bytes whatever the grid (90 MB at 2^14 points: rows of 93 MB at the quick
grid, 111 MB at BraTS size), the image ``C * X * Y * Z * 2`` bytes (10 MB at the quick grid,
84 MB at BraTS size).

Which is faster: keeping the patches in the pipeline. Measured on an idle 2-core CPU: at the
BraTS grid 1.03 rows/s with patches in the pipeline against 0.50 rows/s effective with patches
in the worker (0.73 rows/s streamed, plus 0.6 s of extraction per row on the trainer); with
``--quick`` 1.83 against 1.16 (1.95 streamed).

At the quick grid the reference loader's NIfTI read and preprocessing are cheap (1.8 rows/s), so
the pipeline only levels with it; at the BraTS grid, where they cost about 1.9 s per row, it
was 3.78x and 3.87x faster in two runs (2.0 and 2.1 rows/s on 2 CPUs; scaling 1.60x and 2.07x
from 1 to 2 CPUs). Shipping the image saves bytes only on small grids (7x less at 128x128x80, none at
the BraTS grid, where the float16 image weighs about what the patches do), while extraction
lands on the training process, which is serial and must feed the accelerator; the sampling
tasks scale with CPUs instead. On a GPU trainer extraction would cost milliseconds, so shipping
the (float16, slightly less exact) image could pay off on grids smaller than BraTS's; not
measured here (no GPU), and at the BraTS grid both rows weigh the same.

The last stdout line is the JSON result.
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
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np

from ossnet_bench._common import emit_result, make_parser, pin_cpus, run_worker, setup_logging
from ossnet.augment import apply_augment, sample_augment_params
from ossnet.config import AugmentConfig, SamplingConfig, model_config
from ossnet.phantoms import brats_like
from ossnet.sampling import (
    border_band, downsample_image, extract_patches, lowres_label, normalize_points, sample_points, training_sample,
)
from ossnet_pipelines.synthetic import write_brats_archive

log = logging.getLogger("ossnet_bench.data")

N_POINTS = 2**14
# Object store of each Ray run, as configs/brats2020.yaml gives training. Ray Data starts fewer
# sampling tasks when their outputs (2 rows of 93-111 MB) do not fit the stream's budget: at the
# BraTS grid 2 CPUs gave 0.69 rows/s with 1.5 GB and 0.97 with 4 GB.
STREAM_OBJECT_STORE_MB = 4096
BORDER_RATIO = 0.5
SEED = 0
# name: (grid, cases, samples per case, timed epochs)
SIZES: dict[str, tuple[tuple[int, int, int], int, int, int]] = {
    "full": ((256, 256, 160), 8, 2, 2),
    "quick": ((128, 128, 80), 4, 2, 2),
}


def _configs(grid: tuple[int, int, int]) -> tuple[Any, SamplingConfig, AugmentConfig]:
    return model_config("C", "brats", volume_shape=grid), SamplingConfig(N_POINTS, BORDER_RATIO, 6), AugmentConfig()


# --------------------------------------------------------------------------- (a) reference loader


def reference_row(case_dir: Path, grid: tuple[int, int, int], step: int) -> dict[str, np.ndarray]:
    """One row the reference way: read every NIfTI of the case, preprocess, sample.

    The preprocessing is the project's one scan-to-grid path (``ossnet_pipelines.volumes``, as ingest
    runs it: RAS, z-score, crop/pad), computed in memory for this one case.
    """
    from ossnet_pipelines import nifti, volumes

    model, sampling, augment = _configs(grid)
    case_id = case_dir.name
    paths = [str(case_dir / f"{case_id}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2", "seg")]
    imgs = {p: nifti.load(p) for p in paths}
    shape, affine = nifti.check_case(imgs, {p: p for p in paths}, 1e-3)
    record = volumes.case_record(shape, affine, grid, "nonzero")
    with volumes.compute_options("threads", 1):  # one process, one thread: the reference loader
        lazy = [(da.from_array(nifti.read(imgs[p], p, np.float32), chunks=(-1, -1, 64)), p) for p in paths[:4]]
        image, record = volumes.image_grid(lazy, record)
        seg = da.from_array(nifti.read(imgs[paths[4]], paths[4]), chunks=(-1, -1, 64))
        label, _ = volumes.label_grid(seg, record, (0, 1, 2, 4), paths[4])
        image = np.ascontiguousarray(image.compute())
    band = border_band(label, sampling.band_width)
    return training_sample(image, label, model, sampling, augment, np.random.default_rng([SEED, step]), band=band)


def measure_baseline(archive: Path, grid: tuple[int, int, int], steps: int) -> float:
    """Samples/s of the reference loader over ``steps`` steps cycling through the cases."""
    dirs = sorted(p for p in archive.iterdir() if p.is_dir())
    reference_row(dirs[0], grid, steps)  # warm caches and imports (a step not timed below)
    t0 = time.perf_counter()
    for step in range(steps):
        reference_row(dirs[step % len(dirs)], grid, step)
    return steps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- (b, c) Ray pipeline


def image_rows(arrays: Mapping[str, np.ndarray], case_id: str, epoch: int, spec: Any) -> list[dict[str, np.ndarray]]:
    """Row function of the patches-in-worker variant: ship the augmented image, not patches.

    Same draws as ``training_sample`` (same generator, same order), so a worker that extracts
    patches at ``voxels`` from ``image`` gets the patches of the default rows (up to float16).
    """
    from ossnet_pipelines.data import sample_rng

    image = np.asarray(arrays["image"], dtype=np.float32)
    label = np.asarray(arrays["label"])
    band = np.asarray(arrays["border"]).astype(bool) if "border" in arrays else None
    rows = []
    for repeat in range(spec.samples_per_case):
        rng = sample_rng(spec.seed, epoch, case_id, repeat)
        params = sample_augment_params(spec.augment, image, rng)
        s = spec.sampling
        voxels = sample_points(label, s.n_points, s.border_ratio, rng, s.band_width, band)
        image_aug, label_aug, _, voxels = apply_augment(params, image, label, points=voxels)
        rows.append({
            "image": image_aug.astype(np.float16),
            "voxels": voxels.astype(np.int32),
            "image_lowres": downsample_image(image_aug, spec.model.lowres_input_shape),
            "points": normalize_points(voxels, spec.model.volume_shape),
            "labels": (label_aug[voxels[:, 0], voxels[:, 1], voxels[:, 2]] > 0).astype(np.float32),
            "label_lowres": lowres_label(label_aug, spec.model.lowres_factor).astype(np.float32),
        })
    return rows


def _row_bytes(batch: Mapping[str, Any]) -> int:
    """Bytes of one row of a torch batch."""
    return int(sum(v[0].numel() * v[0].element_size() for v in batch.values()))


def ray_worker(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Run in a subprocess: start Ray with ``cpus`` CPUs and time the pipeline's rows/s."""
    import ray
    import torch

    from ossnet_pipelines.data import EpochClock, build_training_dataset, ingest_options

    grid = tuple(payload["grid"])
    model, sampling, augment = _configs(grid)  # type: ignore[arg-type]
    cpus = int(payload["cpus"])
    pin_cpus(cpus)  # N CPUs: N cores for the sampling tasks and the consuming loop together
    variant = payload.get("variant", "patches")
    # A private instance (never one already running on the host), sockets in a short temp dir.
    temp_dir = tempfile.mkdtemp(prefix="ossnet-bd-", dir="/tmp")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=cpus, object_store_memory=int(payload["object_store_mb"]) << 20,
             include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        clock = EpochClock.create()
        ds = build_training_dataset(
            payload["store"], None, model, sampling, augment, epoch=clock, seed=SEED,
            samples_per_case=int(payload["samples_per_case"]),
            options=ingest_options(object_store_memory=int(payload["object_store_mb"]) * 0.8 * (1 << 20)),
            row_fn=image_rows if variant == "image" else None,
        )
        rows = 0
        extract_s = 0.0
        row_bytes = 0
        t0 = time.perf_counter()
        for epoch in range(1 + int(payload["epochs"])):
            if epoch == 1:  # epoch 0 warms up the worker processes
                rows, extract_s, t0 = 0, 0.0, time.perf_counter()
            clock.set(epoch)
            for batch in ds.iter_torch_batches(batch_size=1):
                row_bytes = _row_bytes(batch)
                if variant == "image":
                    t = time.perf_counter()
                    image = batch["image"][0].to(torch.float32)
                    patches = extract_patches(image, batch["voxels"][0], model.patch.size, model.patch.multiscale)
                    extract_s += time.perf_counter() - t
                    del patches
                rows += len(batch["labels"])
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {"samples_per_s": rows / seconds, "rows": rows, "seconds": seconds, "bytes_per_row": row_bytes,
            "extract_s_per_row": extract_s / max(rows, 1)}


# --------------------------------------------------------------------------- driver


def _ray_run(store: str, grid: tuple[int, int, int], cpus: int, size: tuple[Any, ...],
             variant: str = "patches") -> dict[str, Any]:
    _, _, spc, epochs = size
    payload = {"store": store, "grid": list(grid), "cpus": cpus, "samples_per_case": spc, "epochs": epochs,
               "object_store_mb": STREAM_OBJECT_STORE_MB, "variant": variant}
    out = run_worker("ossnet_bench.data", payload, timeout=3600)
    if not out.ok:
        raise RuntimeError(f"ossnet_bench.data: Ray run with {cpus} CPU(s), variant {variant}: {out.error}")
    log.info("ray %d cpu %s: %.2f samples/s (%d rows in %.1f s, %.1f MB/row)", cpus, variant,
             out.result["samples_per_s"], out.result["rows"], out.result["seconds"], out.result["bytes_per_row"] / 1e6)
    return out.result


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from ossnet_pipelines.ingest import IngestJob, ingest

    name = "quick" if quick else "full"
    size = SIZES[name]
    grid, n_cases, spc, epochs = size
    log.info("%s: %d BraTS-like cases at %s, %d points, patch 7", name, n_cases, grid, N_POINTS)
    cases = [brats_like(grid, seed=SEED + i, case_id=f"bench-{i:03d}") for i in range(n_cases)]
    archive = write_brats_archive(cases, workdir / "archive")
    del cases
    store = str(workdir / "store.zarr")
    t = time.perf_counter()
    report = ingest(IngestJob(source=str(archive), store=store, preset="brats", volume_shape=grid, val_fraction=0.0,
                              executor="serial"))
    if not report.ok:
        raise RuntimeError(f"ossnet_bench.data: ingest failed:\n{report.table()}")
    log.info("ingest: %d cases in %.1f s", n_cases, time.perf_counter() - t)

    baseline = measure_baseline(archive, grid, steps=n_cases * spc * epochs)
    log.info("baseline: %.2f samples/s", baseline)
    one = _ray_run(store, grid, 1, size)
    two = _ray_run(store, grid, 2, size)
    image = _ray_run(store, grid, 2, size, variant="image")
    worker_side = 1.0 / (1.0 / image["samples_per_s"] + image["extract_s_per_row"])
    return {
        "mode": name,
        "grid": list(grid),
        "n_points": N_POINTS,
        "cases": n_cases,
        "samples_per_case": spc,
        "baseline_samples_per_s": round(baseline, 3),
        "ray_1cpu_samples_per_s": round(one["samples_per_s"], 3),
        "ray_2cpu_samples_per_s": round(two["samples_per_s"], 3),
        "speedup_vs_baseline": round(two["samples_per_s"] / baseline, 2),
        "scaling_2_over_1": round(two["samples_per_s"] / one["samples_per_s"], 2),
        "bytes_per_row": two["bytes_per_row"],
        "patches_in_worker_bytes_per_row": image["bytes_per_row"],
        "patches_in_worker_ray_2cpu_samples_per_s": round(image["samples_per_s"], 3),
        "patch_extract_in_worker_s_per_row": round(image["extract_s_per_row"], 4),
        "patches_in_worker_effective_samples_per_s": round(worker_side, 3),
        "faster": "patches_in_worker" if worker_side > two["samples_per_s"] else "patches_in_pipeline",
        "cpu_count": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser: argparse.ArgumentParser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="keep the archive and store here (default: a temporary folder)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.worker:
        emit_result(ray_worker(json.loads(args.worker)))
        return 0
    # Ray's worker processes must import this checkout even when it is not pip-installed.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        emit_result(run(args.quick, workdir))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="ossnet-bench-data-"))
    try:
        emit_result(run(args.quick, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
