"""The ingest driver: discover, skip finished cases, run the rest, assign splits, publish the manifest."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from ossnet import __version__
from ossnet.config import ConfigError, model_config, preset_resample
from ossnet.targets import target_preset
from ossnet_pipelines.ingest.case import CaseContext, CaseReport, one_line
from ossnet_pipelines.ingest.executors import choose_executor, run_process, run_ray, run_serial
from ossnet_pipelines.ingest.job import IngestJob, IngestReport
from ossnet_pipelines.ingest.sources import CaseSpec, IngestError, discover, parse_split_file, source_fs
from ossnet_pipelines.progress import CaseProgress
from ossnet_pipelines.store import ARRAYS, StoreError, create_store

logger = logging.getLogger(__name__)


def seeded_split(case_ids: Iterable[str], val_fraction: float, seed: int,
                 test_fraction: float = 0.0) -> dict[str, str]:
    """Deterministic train/val/test split: ids ranked by ``sha256(f"{seed}:{id}")``; the first
    ``round(val_fraction * n)`` are validation, the next ``round(test_fraction * n)`` test.

    Independent of discovery order and of the executor; adding cases moves few others, and a
    test fraction takes its cases from the training ones (the validation cases stay).
    A non-zero fraction gets at least one case when at least one training case remains.
    """
    ids = sorted(set(case_ids))
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    n_test = round(test_fraction * len(ids))
    if test_fraction > 0 and len(ids) - n_val >= 2:
        n_test = min(max(n_test, 1), len(ids) - n_val - 1)
    n_test = max(0, min(n_test, len(ids) - n_val - 1))
    ranked = sorted(ids, key=lambda cid: hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest())
    split = {cid: "val" for cid in ranked[:n_val]}
    split.update({cid: "test" for cid in ranked[n_val:n_val + n_test]})
    return {cid: split.get(cid, "train") for cid in ids}


def _assign_splits(job: IngestJob, case_ids: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    if job.split_file is None:
        info = {"method": "seed", "seed": job.split_seed, "val_fraction": job.val_fraction,
                "test_fraction": job.test_fraction}
        return seeded_split(case_ids, job.val_fraction, job.split_seed, job.test_fraction), info
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
    t0 = time.perf_counter()
    fs, root = source_fs(job.source)
    targets = target_preset(job.targets)
    label_values = job.label_values
    if label_values is None and targets.kind != "binary":
        label_values = targets.label_values  # the map decides which values a label may hold
    found = discover(fs, root, job.layout, labels_dir=job.labels, label_values=label_values,
                     require_labels=job.require_labels)
    if targets.kind != "binary" and not set(found.layout.allowed_labels) <= set(targets.label_values):
        raise IngestError(f"ingest.label_values: {list(found.layout.allowed_labels)} include values the target map "
                          f"{job.targets!r} does not read ({targets.describe()})")
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
        "arrays": list(ARRAYS), "targets": targets.to_dict(), "targets_name": job.targets,
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
        extra_attrs={"layout": layout.name, "ossnet_version": __version__}, targets=targets,
    )
    executor = choose_executor(job, len(todo))
    logger.info("ingest: %d cases in %s (%s layout): %d to ingest, %d skipped, %d invalid; executor %s x%d",
                len(found.cases), job.source, layout.name, len(todo), sum(r.status == "skipped" for r in reports),
                sum(r.status == "failed" for r in reports), executor, job.workers)
    runner = {"serial": lambda: run_serial(todo, ctx), "process": lambda: run_process(todo, ctx, job.workers),
              "ray": lambda: run_ray(todo, ctx, job.workers)}[executor]
    tracker = CaseProgress("ingest", len(todo))
    try:
        for rep in runner():
            reports.append(rep)
            if rep.status == "failed":
                logger.warning("ingest: %s failed: %s", rep.case_id, rep.message)
            if progress is not None:
                progress(rep)
            tracker.update(rep.status == "failed")
    finally:
        tracker.close()

    complete = sorted(cid for cid, a in store.scan_cases().items() if a.get("complete") is True)
    splits, split_info = _assign_splits(job, complete)
    store.write_manifest(splits, split_info)
    failed = {r.case_id: r.message for r in reports if r.status == "failed"}
    store.update_attrs(last_ingest={"source": str(job.source), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "failed": failed})
    reports = [CaseReport(r.case_id, r.status, r.message, r.seconds, splits.get(r.case_id)) for r in reports]
    report = IngestReport(str(job.store), layout.name, tuple(sorted(reports, key=lambda r: r.case_id)),
                          time.perf_counter() - t0, executor, tuple(found.hidden))
    if found.hidden:
        logger.info("ingest: skipped %d hidden files or folders (names starting with '.' or '__')", len(found.hidden))
    logger.info("ingest: %d ingested, %d skipped, %d failed in %.1f s", report.count("ingested"),
                report.count("skipped"), report.count("failed"), report.seconds)
    return report


__all__ = ["ingest", "seeded_split"]
