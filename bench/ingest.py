"""Ingest benchmark: the chunked (dask) volume path against the in-memory one, and case throughput.

``python -m ossnet_bench.ingest [--quick]``

1. **A scan larger than memory should be.** A synthetic float32 scan (1024x1024x600, 2.4 GB;
   ``--quick``: 512x512x300, 315 MB) with a label, written as ``.nii`` and as ``.nii.gz``, is
   ingested onto the BraTS grid (256x256x160, ``resample: resize``) twice, each in a fresh
   process: by ``ossnet_pipelines.ingest`` (lazy slabs, ``ossnet_pipelines.volumes``) and by the in-memory path
   the project used before (read the whole channel, z-score it in place, transform it with
   NumPy, write it). The figure is the process's peak RSS (``ru_maxrss``, imports included)
   and the ingest's seconds. Batch inference's per-case stages then segment the ``.nii`` scan
   with a tiny model and write the mask back at scan size (``peak_rss_mb_infer_nii``), and a
   scan 4x smaller per axis the same way (``peak_rss_mb_infer_small_nii``): the two peaks should
   be level, set by torch and the model grid, not by the scan.
2. **Throughput.** An archive of 16 BraTS-size cases (240x240x155, four modalities and a
   label, ``.nii.gz``) is ingested by a pool of 1 and of 2 worker processes, the run pinned to
   1 and to 2 cores (both pay the pool's start-up, so the ratio is the scaling).

Last stdout line: one JSON object with ``peak_rss_mb_dask``, ``peak_rss_mb_inmemory``,
``seconds_dask``, ``seconds_inmemory`` (the ``.nii.gz`` file; ``*_nii`` keys for ``.nii``),
``cases_per_s_1cpu``, ``cases_per_s_2cpu``, ``scaling`` and ``goals`` (dask peak at most 1/3 of
the in-memory one and below 1 GB, at most 1.2x its time, inference peak within 1.25x of the small
scan's, scaling from 1 to 2 CPUs >= 1.6).
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ossnet_bench._common import emit_result, make_parser, pin_cpus, round_mb, run_worker, serve_worker, setup_logging

log = logging.getLogger("ossnet_bench.ingest")

LARGE = (1024, 1024, 600)
QUICK_LARGE = (512, 512, 300)
BRATS_SHAPE = (240, 240, 155)
GRID = (256, 256, 160)


# --------------------------------------------------------------------------- data


def write_large_scan(folder: Path, shape: Sequence[int], compress: bool) -> Path:
    """A generic-layout case ``big``: a noisy ball in float32 and its label, streamed to disk."""
    import dask.array as da

    from ossnet_pipelines.nifti import write_volume

    suffix = ".nii.gz" if compress else ".nii"
    affine = np.diag([0.7, 0.7, 0.8, 1.0])
    chunks = (shape[0], shape[1], 16)
    coords = [da.arange(s, chunks=c, dtype=np.float32) / np.float32(s) - np.float32(0.5) for s, c in zip(shape, chunks)]
    q = coords[0][:, None, None] ** 2 + coords[1][None, :, None] ** 2 + coords[2][None, None, :] ** 2
    ball = (q < np.float32(0.09)).rechunk(chunks)
    noise = da.random.default_rng(0).standard_normal(tuple(shape), chunks=chunks, dtype=np.float32)
    image = (np.float32(300.0) + np.float32(150.0) * ball + np.float32(20.0) * noise).astype(np.float32)
    write_volume(str(folder / "images" / f"big{suffix}"), image, affine, compress=compress)
    write_volume(str(folder / "labels" / f"big{suffix}"), ball.astype(np.uint8), affine, compress=compress)
    return folder


def write_brats_archive(folder: Path, n: int, shape: Sequence[int]) -> Path:
    """``n`` BraTS-size cases (easy phantoms generated at ``shape``) in the BraTS layout."""
    from ossnet.phantoms import brats_like
    from ossnet_pipelines.synthetic import write_brats_archive as write

    for i in range(n):
        write([brats_like(tuple(shape), seed=1000 + i, case_id=f"BraTS20_Training_{i:03d}")], folder)
    return folder


# --------------------------------------------------------------------------- worker side


def _in_memory_ingest(source: Path, store_url: str) -> None:
    """The in-memory path on the same files: whole channels in memory, NumPy transform."""
    from ossnet.config import model_config
    from ossnet.preprocess import preprocess_channel, preprocess_label
    from ossnet.border import border_band
    from ossnet_pipelines import nifti, volumes
    from ossnet_pipelines.store import create_store

    images, labels = sorted((source / "images").iterdir()), sorted((source / "labels").iterdir())
    store = create_store(store_url, {"modalities": ["image"], "volume_shape": list(GRID), "band_width": 6,
                                     "zscore_mask": "all", "resample": "resize"}, overwrite=True)
    cfg = model_config("C", "brats", volume_shape=GRID)
    for image_path, label_path in zip(images, labels):
        img, lab = nifti.load(str(image_path)), nifti.load(str(label_path))
        record = volumes.case_record(img.shape, img.affine, cfg.volume_shape, "all", "resize")
        grid, _ = preprocess_label(nifti.read(lab, str(label_path)), record, (0, 1))
        x = nifti.read(img, str(image_path), np.float32)
        image, mean, std = preprocess_channel(x, record)
        del x
        with store.case_writer(image_path.name.split(".")[0]) as writer:
            writer.write_array("image", image[None].astype(np.float16))
            writer.write_array("label", grid)
            writer.write_array("border", border_band(grid, 6).astype(np.uint8))
            writer.commit({"preprocess": record.with_stats([mean], [std]).to_dict()})


def _infer_large(source: Path, out: str) -> dict[str, Any]:
    """Batch inference's per-case stages on the large scan: a tiny variant C (64^3 grid, resize),
    the mask written back onto the scan's 1024x1024x600 grid and scored against its label."""
    import torch

    from ossnet.checkpoint import PreprocessSpec, checkpoint_bytes
    from ossnet.config import model_config
    from ossnet.model import build_model
    from ossnet_pipelines.infer.cases import InferCase
    from ossnet_pipelines.infer.outputs import OutputLayout
    from ossnet_pipelines.infer.stages import CasePredictor, StageContext, process_case

    torch.manual_seed(0)
    grid = (64, 64, 64)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=grid))
    spec = PreprocessSpec(modalities=("image",), volume_shape=grid, zscore_mask="all", resample="resize")
    layout = OutputLayout(out)
    layout.prepare(False, False)
    ctx = StageContext(modalities=("image",), volume_shape=grid, zscore_mask="all", outputs=layout, resample="resize")
    image, label = sorted((source / "images").iterdir())[0], sorted((source / "labels").iterdir())[0]
    result = process_case(InferCase("big", images=(("image", str(image)),), label=str(label)), ctx,
                          CasePredictor(checkpoint_bytes(model, spec)))
    if result.status != "ok":
        raise RuntimeError(result.error)
    return {"dice": result.dice}


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One measured ingest (or inference) in this (fresh) process."""
    from ossnet_pipelines.ingest import IngestJob, ingest

    if payload.get("cpus"):
        pin_cpus(int(payload["cpus"]))  # the pool's parent and workers share these cores
    source, store = Path(payload["source"]), payload["store"]
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if payload["path"] == "inmemory":
        _in_memory_ingest(source, store)
        ok = True
    elif payload["path"] == "infer":
        extra = _infer_large(source, store)
        ok = True
    else:
        report = ingest(IngestJob(source=str(source), store=store, layout=payload.get("layout", "generic"),
                                  preset="brats", volume_shape=tuple(payload.get("grid", GRID)),
                                  resample=payload.get("resample", "resize"), workers=int(payload.get("workers", 1)),
                                  executor=payload.get("executor", "serial"), threads=int(payload.get("threads", 1)),
                                  val_fraction=0.0, overwrite=True))
        ok = report.ok
        if not ok:
            raise RuntimeError(report.table())
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024.0, "children_peak_rss_mb": children_kb / 1024.0,
            "ok": ok, **extra}


# --------------------------------------------------------------------------- driver side


def _measure(payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    outcome = run_worker("ossnet_bench.ingest", payload, timeout=timeout)
    if not outcome.ok:
        log.warning("%s failed: %s", payload, outcome.error)
        return {"ok": False, "error": outcome.error}
    log.info("%s %s: %.1f s, peak RSS %.0f MiB", payload["path"], Path(payload["source"]).name,
             outcome.result["seconds"], outcome.result["peak_rss_mb"])
    return {"ok": True, **outcome.result}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16, help="BraTS-size cases for the throughput run "
                        "(default: 16)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.worker is not None:
        return serve_worker(worker, args.worker, log)

    shape = QUICK_LARGE if args.quick else LARGE
    n_cases = args.cases
    timeout = 3600.0
    root = Path(args.workdir or tempfile.mkdtemp(prefix="ossnet-bench-ingest-"))
    start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "ingest", "quick": bool(args.quick), "scan_shape": list(shape),
                              "scan_mb": round(float(np.prod(shape)) * 4 / 2**20, 1), "grid": list(GRID),
                              "cases": n_cases}
    try:
        for compress, suffix in ((True, ""), (False, "_nii")):
            folder = root / ("gz" if compress else "nii")
            log.info("writing the %s scan %s", "compressed" if compress else "uncompressed", "x".join(map(str, shape)))
            write_large_scan(folder, shape, compress)
            for path in ("dask", "inmemory") + (("infer",) if not compress else ()):
                res = _measure({"path": path, "source": str(folder), "store": str(root / f"{path}{suffix}.zarr")},
                               timeout)
                result[f"peak_rss_mb_{path}{suffix}"] = round_mb(res.get("peak_rss_mb"))
                result[f"seconds_{path}{suffix}"] = round_mb(res.get("seconds"), 2)
                if not res["ok"]:
                    result[f"error_{path}{suffix}"] = res["error"]
            shutil.rmtree(folder, ignore_errors=True)
        # inference memory is the grid's and torch's: the same stages on a scan 64x smaller
        small = tuple(max(8, n // 4) for n in shape)
        write_large_scan(root / "small", small, False)
        res = _measure({"path": "infer", "source": str(root / "small"), "store": str(root / "small_out")}, timeout)
        result["peak_rss_mb_infer_small_nii"] = round_mb(res.get("peak_rss_mb"))
        shutil.rmtree(root / "small", ignore_errors=True)
        archive = write_brats_archive(root / "brats", n_cases, BRATS_SHAPE)
        for workers in (1, 2):
            res = _measure({"path": "dask", "source": str(archive), "store": str(root / f"brats{workers}.zarr"),
                            "layout": "brats", "resample": "none", "workers": workers, "executor": "process",
                            "cpus": workers}, timeout)
            result[f"cases_per_s_{workers}cpu"] = round(n_cases / res["seconds"], 3) if res["ok"] else None
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    r = result
    result["rss_ratio"] = round(r["peak_rss_mb_dask"] / r["peak_rss_mb_inmemory"], 3) \
        if r.get("peak_rss_mb_dask") and r.get("peak_rss_mb_inmemory") else None
    result["time_ratio"] = round(r["seconds_dask"] / r["seconds_inmemory"], 3) \
        if r.get("seconds_dask") and r.get("seconds_inmemory") else None
    result["scaling"] = round(r["cases_per_s_2cpu"] / r["cases_per_s_1cpu"], 3) \
        if r.get("cases_per_s_1cpu") and r.get("cases_per_s_2cpu") else None
    result["goals"] = {
        "peak_rss_at_most_a_third": result["rss_ratio"] is not None and result["rss_ratio"] <= 1 / 3,
        "peak_rss_below_1gb": bool(r.get("peak_rss_mb_dask")) and r["peak_rss_mb_dask"] < 1024,
        "inference_rss_flat_in_scan_size": bool(r.get("peak_rss_mb_infer_nii")) and bool(
            r.get("peak_rss_mb_infer_small_nii")) and r["peak_rss_mb_infer_nii"] <= 1.25 * r["peak_rss_mb_infer_small_nii"],
        "time_at_most_1.2x": result["time_ratio"] is not None and result["time_ratio"] <= 1.2,
        "scaling_at_least_1.6": result["scaling"] is not None and result["scaling"] >= 1.6,
    }
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
