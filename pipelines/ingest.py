"""Ingest NIfTI archives (BraTS 2020, LiTS, generic) into an ossnet Zarr store, in parallel.

``ingest(IngestJob(...)) -> IngestReport`` is the API; ``configure_ingest_parser`` and
``run_ingest_cli`` are the ``ossnet ingest`` command. Discovery lives in
``pipelines.ingest_sources``, the per-case work in ``pipelines.ingest_case``.

Memory: a case holds one source channel as float32 plus its model-grid copy at a time. Measured
on a 512^3 int16 LiTS-like case (256 MiB of voxels, ``preset="lits"``): peak RSS grew by
1.17 GiB over the imports, i.e. ~4.6x the volume's own size.

Parallelism: with ``workers > 1`` cases run as Ray tasks when a Ray cluster is up (``ray.init``
already called or ``RAY_ADDRESS`` set), so an ingest spreads over the nodes, each task asking
Ray for the memory one case needs; otherwise in a local process pool (no cluster start-up for a
laptop ingest). Cases are independent and write disjoint groups, so both are safe; one task per
case keeps a failure (or an OOM kill, retried by Ray) confined to its case. The driver alone
writes the manifest, after every case has finished.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

from ossnet import __version__
from ossnet.config import PRESETS, ConfigError, model_config, preset_resample
from ossnet.geometry import RESAMPLE_MODES
from pipelines.ingest_case import CaseContext, CaseError, CaseReport, ingest_case, one_line
from pipelines.ingest_sources import LAYOUTS, CaseSpec, IngestError, discover, parse_split_file, source_fs
from pipelines.store import ARRAYS, StoreError, create_store
from pipelines.volumes import SCHEDULERS

logger = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("auto", "serial", "process", "ray")
ZSCORE_CHOICES: tuple[str, ...] = ("auto", "nonzero", "all")
RESAMPLE_CHOICES: tuple[str, ...] = ("auto",) + RESAMPLE_MODES


@dataclass(frozen=True)
class IngestJob:
    """One ingest run.

    Attributes:
        source: archive folder or CSV (local path, ``file://`` or fsspec URL).
        store: store path or URL (``file://``, ``memory://``, ``s3://``...).
        layout: "auto", "brats", "lits" or "generic".
        labels: generic layout: labels folder (default ``<source>/labels``).
        preset: model preset whose grid the store holds (``ossnet.config.PRESETS``).
        volume_shape: override the preset's full-resolution grid ``(X, Y, Z)``.
        band_width: border band half-width in voxels (6 = the paper's 13^3 band).
        zscore_mask: "auto" (BraTS: nonzero, others: all), "nonzero" or "all".
        resample: "auto" (the preset's: ``resize`` for lits, else ``none``), "none" (keep the voxel
            grid, crop/pad), "resize" (stretch onto the grid) or "spacing" (resample to
            ``target_spacing``, then crop/pad); see ``ossnet.geometry``.
        target_spacing: voxel spacing in mm along the RAS axes, for ``resample="spacing"``.
        threads: dask threads per case (chunks of one scan read and transformed in parallel).
        scheduler: "threads" (dask's threaded scheduler in each case task) or "ray" (one scan's
            chunks spread over the Ray cluster; the source must be on storage every node sees).
        label_values: allowed source label values (default per layout; generic: 0, 1).
        val_fraction: fraction of cases in the validation split (when no split file).
        split_seed: seed of the deterministic split.
        split_file: JSON / CSV / reference-style text split file; overrides the seeded split.
        workers: cases processed in parallel.
        executor: "auto", "serial", "process" or "ray".
        overwrite: delete the store first and ingest everything again.
        require_labels: fail cases without a label (False: ingest them unlabelled).
        affine_atol: tolerance (mm) when comparing the affines of a case's files.
        storage_options: fsspec options for the store URL.
    """

    source: str
    store: str
    layout: str = "auto"
    labels: str | None = None
    preset: str = "brats"
    volume_shape: tuple[int, int, int] | None = None
    band_width: int = 6
    zscore_mask: str = "auto"
    resample: str = "auto"
    target_spacing: tuple[float, float, float] | None = None
    threads: int = 1
    scheduler: str = "threads"
    label_values: tuple[int, ...] | None = None
    val_fraction: float = 0.15
    split_seed: int = 0
    split_file: str | None = None
    workers: int = 1
    executor: str = "auto"
    overwrite: bool = False
    require_labels: bool = True
    affine_atol: float = 1e-3
    storage_options: Mapping[str, Any] | None = None

    def validate(self) -> "IngestJob":
        """Check every field; raise ``IngestError`` naming the first bad one. Returns self."""
        checks = [
            (bool(str(self.source)), "source", "must not be empty"),
            (bool(str(self.store)), "store", "must not be empty"),
            (self.layout in LAYOUTS, "layout", f"must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.band_width >= 0, "band_width", f"must be >= 0, got {self.band_width}"),
            (self.zscore_mask in ZSCORE_CHOICES, "zscore_mask", f"must be one of {', '.join(ZSCORE_CHOICES)}"),
            (self.resample in RESAMPLE_CHOICES, "resample",
             f"must be one of {', '.join(RESAMPLE_CHOICES)}, got {self.resample!r}"),
            (self.resample != "spacing" or self.target_spacing is not None, "target_spacing",
             "required with resample 'spacing' (three spacings in mm)"),
            (self.target_spacing is None or (len(self.target_spacing) == 3 and all(
                math.isfinite(float(v)) and float(v) > 0 for v in self.target_spacing)), "target_spacing",
             f"needs three positive spacings in mm, got {self.target_spacing}"),
            (self.threads >= 1, "threads", f"must be >= 1, got {self.threads}"),
            (self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}"),
            (self.workers >= 1, "workers", f"must be >= 1, got {self.workers}"),
            (self.executor in EXECUTORS, "executor", f"must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"),
            (self.affine_atol >= 0, "affine_atol", f"must be >= 0, got {self.affine_atol}"),
            (self.volume_shape is None or len(self.volume_shape) == 3, "volume_shape", "needs three sizes"),
            (self.label_values is None or all(int(v) >= 0 for v in self.label_values), "label_values",
             "must be non-negative integers"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise IngestError(f"ingest.{name}: {message}")
        return self


@dataclass(frozen=True)
class IngestReport:
    """Outcome of an ingest run."""

    store: str
    layout: str
    cases: tuple[CaseReport, ...]
    seconds: float
    executor: str = "serial"

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cases)

    @property
    def failed(self) -> tuple[CaseReport, ...]:
        return tuple(c for c in self.cases if c.status == "failed")

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def table(self) -> str:
        """A fixed-width summary table: one row per case, then the totals."""
        width = max([len("case")] + [len(c.case_id) for c in self.cases])
        lines = [f"{'case':<{width}}  {'status':<8}  {'split':<10}  {'sec':>6}  message"]
        for c in sorted(self.cases, key=lambda r: (r.status != "failed", r.case_id)):
            row = f"{c.case_id:<{width}}  {c.status:<8}  {c.split or '-':<10}  {c.seconds:6.1f}  {c.message}"
            lines.append(row.rstrip())
        lines.append(f"{self.count('ingested')} ingested, {self.count('skipped')} skipped, "
                     f"{self.count('failed')} failed in {self.seconds:.1f} s -> {self.store}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


def _progress(done: int, total: int, failed: int, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    logger.info("ingest: %d/%d cases (%d failed), %.2f cases/s, eta %.0f s", done, total, failed, rate, eta)


def _run_serial(specs: Sequence[CaseSpec], ctx: CaseContext) -> Iterator[CaseReport]:
    for spec in specs:
        yield ingest_case(spec, ctx)


def _run_process(specs: Sequence[CaseSpec], ctx: CaseContext, workers: int) -> Iterator[CaseReport]:
    # spawn, not fork: the parent may hold zarr's asyncio loop thread and torch threads.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(ingest_case, spec, ctx): spec for spec in specs}
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                yield fut.result()
            except Exception as exc:  # a worker died (e.g. killed for memory)
                yield CaseReport(spec.case_id, "failed", one_line(f"{spec.case_id}: worker failed: {exc}"))


def _case_memory_bytes(volume_shape: Sequence[int]) -> int:
    # float32 source channel + float32 grid copy + label/band masks and slabs, with headroom
    # (measured: 1.17 GiB for a 512^3 case, for which this asks 2.5 GiB).
    return int(16 * math.prod(volume_shape)) + (512 << 20)


def _run_ray(specs: Sequence[CaseSpec], ctx: CaseContext, workers: int) -> Iterator[CaseReport]:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    memory = _case_memory_bytes(ctx.volume_shape)
    cluster_memory = ray.cluster_resources().get("memory", 0.0)
    if cluster_memory:
        memory = min(memory, int(cluster_memory * 0.5))  # never ask for more than one node can give
    task = ray.remote(ingest_case).options(num_cpus=1, memory=memory, max_retries=2, name="ossnet-ingest-case")
    pending = list(specs)
    running: dict[Any, CaseSpec] = {}
    while pending or running:
        while pending and len(running) < workers:  # bounded in-flight: the driver never floods the cluster
            spec = pending.pop(0)
            running[task.remote(spec, ctx)] = spec
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            spec = running.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as exc:  # the task's worker died after its retries
                yield CaseReport(spec.case_id, "failed", one_line(f"{spec.case_id}: ray task failed: {exc}"))


def _choose_executor(job: IngestJob, n_todo: int) -> str:
    in_process = str(job.store).startswith("memory://")
    if job.executor != "auto":
        if in_process and job.executor != "serial":
            raise IngestError(f"{job.store}: a memory:// store lives in one process; use executor 'serial'")
        return job.executor
    if job.workers == 1 or n_todo <= 1 or in_process:
        return "serial"
    try:
        import ray

        if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
            return "ray"
    except ImportError:
        pass
    return "process"


# --------------------------------------------------------------------------------------------
# Splits and the driver
# --------------------------------------------------------------------------------------------


def seeded_split(case_ids: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic train/val split: the ``round(val_fraction * n)`` ids ranking lowest by
    ``sha256(f"{seed}:{id}")`` are validation.

    Independent of discovery order and of the executor; adding cases moves few others.
    At least one case goes to each split when ``val_fraction > 0`` and there are >= 2 cases.
    """
    ids = sorted(set(case_ids))
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    ranked = sorted(ids, key=lambda cid: hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return {cid: ("val" if cid in val else "train") for cid in ids}


def _assign_splits(job: IngestJob, case_ids: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    if job.split_file is None:
        info = {"method": "seed", "seed": job.split_seed, "val_fraction": job.val_fraction}
        return seeded_split(case_ids, job.val_fraction, job.split_seed), info
    listed = parse_split_file(job.split_file)
    unlisted = sorted(set(case_ids) - set(listed))
    if unlisted:
        logger.warning("ingest: %d cases are not in split file %s (split 'unassigned'): %s",
                       len(unlisted), job.split_file, ", ".join(unlisted[:5]))
    missing = sorted(set(listed) - set(case_ids))
    if missing:
        logger.info("ingest: %d cases of split file %s are not in the store", len(missing), job.split_file)
    return {cid: listed.get(cid, "unassigned") for cid in case_ids}, {"method": "file", "path": str(job.split_file)}


def _unchanged(spec: CaseSpec, attrs: Mapping[str, Any], fs: Any) -> bool:
    """Whether a complete case was ingested from the same files (paths and sizes)."""
    sources = attrs.get("sources", {})
    files = spec.files
    if set(sources) != set(files):
        return False
    try:
        return all(sources[k].get("path") == p and sources[k].get("size") == fs.size(p) for k, p in files.items())
    except Exception:  # unreadable source: let the case task report it
        return False


def ingest(job: IngestJob, progress: Callable[[CaseReport], None] | None = None) -> IngestReport:
    """Ingest ``job.source`` into ``job.store``; bad cases are reported, the others ingested.

    A re-run skips complete cases whose source files are unchanged, and rewrites partial or
    stale ones (``overwrite`` rewrites everything). The manifest (case -> split) is published
    at the end and lists only complete cases.

    Args:
        job: the ingest job.
        progress: optional callback per finished case.

    Returns:
        The per-case report.

    Raises:
        IngestError: the source, layout, split file, preset or store is unusable.
    """
    job.validate()
    t0 = time.perf_counter()
    fs, root = source_fs(job.source)
    found = discover(fs, root, job.layout, labels_dir=job.labels, label_values=job.label_values,
                     require_labels=job.require_labels)
    layout = found.layout
    try:
        cfg = model_config("C", job.preset, volume_shape=job.volume_shape)
    except ConfigError as exc:
        raise IngestError(f"ingest.preset: {exc}") from exc
    if cfg.encoder.in_channels != len(layout.modalities):
        logger.info("ingest: %d modalities; preset %s defaults to %d input channels (build the model with "
                    "in_channels=%d)", len(layout.modalities), job.preset, cfg.encoder.in_channels,
                    len(layout.modalities))
    zscore_mask = layout.zscore_mask if job.zscore_mask == "auto" else job.zscore_mask
    resample = preset_resample(job.preset) if job.resample == "auto" else job.resample
    target_spacing = tuple(float(v) for v in job.target_spacing) if resample == "spacing" else None
    info = {
        "layout": layout.name, "modalities": list(layout.modalities), "label_meaning": layout.label_meaning,
        "allowed_labels": list(layout.allowed_labels), "preset": job.preset,
        "volume_shape": list(cfg.volume_shape), "lowres_shape": list(cfg.lowres_input_shape),
        "latent_shape": list(cfg.latent_shape), "lowres_factor": cfg.lowres_factor, "band_width": job.band_width,
        "zscore_mask": zscore_mask, "orientation": "RAS", "image_dtype": "float16",
        "resample": resample, "target_spacing": None if target_spacing is None else list(target_spacing),
        "arrays": list(ARRAYS),
    }
    if job.split_file is not None:
        parse_split_file(job.split_file)  # fail before any work if it is unreadable
    try:
        store = create_store(job.store, info, overwrite=job.overwrite, storage_options=job.storage_options)
    except StoreError as exc:
        raise IngestError(str(exc)) from exc

    existing = {} if job.overwrite else store.scan_cases()
    reports: list[CaseReport] = []
    todo: list[CaseSpec] = []
    for spec in found.cases:
        attrs = existing.get(spec.case_id)
        if spec.error is not None:
            reports.append(CaseReport(spec.case_id, "failed", one_line(spec.error)))
        elif attrs is not None and attrs.get("complete") is True and _unchanged(spec, attrs, fs):
            reports.append(CaseReport(spec.case_id, "skipped", "already complete"))
        else:
            if attrs is not None:
                logger.info("ingest: %s is %s; rewriting it", spec.case_id,
                            "stale" if attrs.get("complete") else "partial")
            todo.append(spec)
    # Hide the cases about to be rewritten from readers until they are complete again.
    visible = {cid: s for cid, s in store.manifest.items() if cid not in {t.case_id for t in todo}}
    if visible != store.manifest:
        store.write_manifest(visible, store.attrs.get("manifest", {}).get("splits", {}))

    ctx = CaseContext(
        store_url=str(job.store), storage_options=job.storage_options, source_options=None, layout=layout,
        volume_shape=cfg.volume_shape, band_width=job.band_width, zscore_mask=zscore_mask,
        affine_atol=job.affine_atol, resample=resample, target_spacing=target_spacing,  # type: ignore[arg-type]
        scheduler=job.scheduler, threads=job.threads,
        extra_attrs={"layout": layout.name, "ossnet_version": __version__},
    )
    executor = _choose_executor(job, len(todo))
    logger.info("ingest: %d cases in %s (%s layout): %d to ingest, %d skipped, %d invalid; executor %s x%d",
                len(found.cases), job.source, layout.name, len(todo), sum(r.status == "skipped" for r in reports),
                sum(r.status == "failed" for r in reports), executor, job.workers)
    runner = {"serial": lambda: _run_serial(todo, ctx), "process": lambda: _run_process(todo, ctx, job.workers),
              "ray": lambda: _run_ray(todo, ctx, job.workers)}[executor]
    t_run = time.perf_counter()
    n_failed = 0
    for i, rep in enumerate(runner(), start=1):
        reports.append(rep)
        n_failed += rep.status == "failed"
        if rep.status == "failed":
            logger.warning("ingest: %s failed: %s", rep.case_id, rep.message)
        if progress is not None:
            progress(rep)
        if i == len(todo) or i % max(1, len(todo) // 20) == 0:
            _progress(i, len(todo), n_failed, t_run)

    complete = sorted(cid for cid, a in store.scan_cases().items() if a.get("complete") is True)
    splits, split_info = _assign_splits(job, complete)
    store.write_manifest(splits, split_info)
    failed = {r.case_id: r.message for r in reports if r.status == "failed"}
    store.update_attrs(last_ingest={"source": str(job.source), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "failed": failed})
    reports = [CaseReport(r.case_id, r.status, r.message, r.seconds, splits.get(r.case_id)) for r in reports]
    report = IngestReport(str(job.store), layout.name, tuple(sorted(reports, key=lambda r: r.case_id)),
                          time.perf_counter() - t0, executor)
    logger.info("ingest: %d ingested, %d skipped, %d failed in %.1f s", report.count("ingested"),
                report.count("skipped"), report.count("failed"), report.seconds)
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def configure_ingest_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ossnet ingest`` arguments to ``parser`` (the lead's CLI calls this)."""
    parser.description = ("Convert a NIfTI archive (BraTS 2020, LiTS or generic image/label pairs) into an "
                          "ossnet Zarr store: reoriented to RAS, z-scored, resampled (--resample) and "
                          "cropped/padded to the preset grid, with labels and border bands. Scans are read and "
                          "transformed in slabs, so a scan larger than memory ingests too. Re-running "
                          "completes an interrupted ingest. Exits 1 if any case failed.")
    parser.add_argument("source", help="archive folder or CSV (columns image|image_<modality>, label, [case_id])")
    parser.add_argument("--store", required=True, help="output store path or URL (file://, s3://, memory://...)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="archive layout (default: detect)")
    parser.add_argument("--labels", default=None, help="generic layout: labels folder (default: <source>/labels)")
    parser.add_argument("--preset", choices=PRESETS, default="brats", help="model grid preset (default: brats)")
    parser.add_argument("--volume-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="override the preset's full-resolution grid")
    parser.add_argument("--band-width", type=int, default=6, help="border band half-width in voxels (default: 6)")
    parser.add_argument("--zscore-mask", choices=ZSCORE_CHOICES, default="auto",
                        help="z-score over nonzero voxels or all voxels (auto: BraTS nonzero, others all)")
    parser.add_argument("--resample", choices=RESAMPLE_CHOICES, default="auto",
                        help="how scans reach the grid: none (reorient, crop/pad), resize (stretch onto the grid, as "
                             "the paper does for LiTS), spacing (resample to --target-spacing, then crop/pad); "
                             "auto: the preset's (lits: resize, others: none)")
    parser.add_argument("--target-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm (RAS axes) for --resample spacing, e.g. 1 1 1")
    parser.add_argument("--threads", type=int, default=1,
                        help="dask threads per case: slabs of one scan read and transformed in parallel (default: 1)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="threads",
                        help="threads: dask threads inside each case task; ray: one scan's slabs over the Ray cluster")
    parser.add_argument("--label-values", type=_int_list, default=None,
                        help="allowed source label values, e.g. 0,1,2 (default per layout; generic 0,1)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="validation fraction (default: 0.15)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the deterministic split (default: 0)")
    parser.add_argument("--split-file", default=None,
                        help="split file (JSON, CSV case_id,split, or reference 'Training:/Validation:' text)")
    parser.add_argument("--workers", type=int, default=1, help="cases in parallel (default: 1)")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="auto: Ray if a cluster is up, else processes when --workers > 1")
    parser.add_argument("--overwrite", action="store_true", help="delete the store first and ingest everything")
    parser.add_argument("--allow-unlabeled", action="store_true", help="ingest cases without a label file")
    return parser


def job_from_args(args: argparse.Namespace) -> IngestJob:
    """Build and validate an ``IngestJob`` from parsed ``configure_ingest_parser`` arguments."""
    return IngestJob(
        source=args.source, store=args.store, layout=args.layout, labels=args.labels, preset=args.preset,
        volume_shape=tuple(args.volume_shape) if args.volume_shape else None, band_width=args.band_width,
        zscore_mask=args.zscore_mask, resample=args.resample,
        target_spacing=tuple(args.target_spacing) if args.target_spacing else None, threads=args.threads,
        scheduler=args.scheduler, label_values=args.label_values, val_fraction=args.val_fraction,
        split_seed=args.split_seed, split_file=args.split_file, workers=args.workers, executor=args.executor,
        overwrite=args.overwrite, require_labels=not args.allow_unlabeled,
    ).validate()


def run_ingest_cli(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``ossnet ingest``: print the summary table; 0 if every case ingested or was skipped,
    1 if any case failed, 2 if the ingest could not run at all."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        report = ingest(job_from_args(args))
    except (IngestError, StoreError) as exc:
        err.write(f"error: {one_line(exc)}\n")
        return 2
    out.write(report.table() + "\n")
    return 0 if report.ok else 1


__all__ = [
    "CaseContext",
    "CaseError",
    "CaseReport",
    "IngestError",
    "IngestJob",
    "IngestReport",
    "configure_ingest_parser",
    "ingest",
    "ingest_case",
    "job_from_args",
    "run_ingest_cli",
    "seeded_split",
]
