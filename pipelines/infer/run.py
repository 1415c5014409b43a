"""``run_inference(job)``: resolve the model, list the cases, skip finished ones, run the Ray pipeline.

Order of work (each step fails before the next starts):

1. the model spec is looked up in the registry (``locate_model``: no download); an unknown
   name, alias, version, run or file raises ``ModelNotFoundError`` before anything else;
2. the checkpoint is fetched (cached by model id) and its ``PreprocessSpec`` read;
3. the input is listed and its channels checked against the spec (``InferError`` on mismatch);
4. the output folder is prepared (stale temporary files of a killed run removed) and the
   previous report read: cases it reports ok for the same checkpoint, with all outputs present,
   are skipped;
5. Ray Data: ``from_items`` (one block per case) -> ``map(read_case)`` CPU tasks ->
   ``map_batches(CasePredictor, compute=ActorPoolStrategy(size=actors), num_gpus=...,
   batch_size=1)`` -> ``map(write_case)`` CPU tasks, streamed to the driver with
   ``iter_rows``: progress lines, and the report rewritten every ``report_every_s`` seconds
   (and on exit, also on Ctrl-C), so a killed job keeps the record of what it finished.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from typing import Any, Callable, Iterable

from ossnet_pipelines.infer.cases import CaseListing, InferCase, list_cases
from ossnet_pipelines.infer.job import CaseResult, InferError, InferJob, InferReport
from ossnet_pipelines.infer.outputs import OutputLayout, plan_cases, read_report, remove_stale_temps, write_report
from ossnet_pipelines.progress import CaseProgress
from ossnet_pipelines.raystart import ensure_ray

logger = logging.getLogger(__name__)

LOST_CASE_RETRIES = 1  # extra passes over cases whose worker or node died under them


def _model(job: InferJob) -> tuple[str, bytes]:
    """``(resolved model description, checkpoint bytes)``; raises ``ModelNotFoundError`` first."""
    from ossnet_pipelines.tracking.registry import locate_model, resolve_model_uri

    loc = locate_model(job.model, job.tracking_uri)  # registry lookups only: fail before any work
    path = resolve_model_uri(job.model, job.tracking_uri)
    if loc.kind == "registry":
        name = f"models:/{loc.name}/{loc.version}"
    elif loc.model_id:
        name = f"models:/{loc.model_id}"
    else:
        name = str(path)
    with open(path, "rb") as fh:
        return name, fh.read()


def _pipeline(cases: list[InferCase], job: InferJob, ctx: Any, checkpoint: bytes, gpus: float) -> Iterable[dict]:
    """The Ray Data plan; yields one report row per case as cases finish."""
    import ray
    import ray.data

    from ossnet_pipelines.infer.stages import CasePredictor, case_item, read_case, write_case

    checkpoint_ref = ray.put(checkpoint)
    actors = min(int(job.actors), len(cases))
    ds = ray.data.from_items([case_item(c) for c in cases], override_num_blocks=len(cases))
    ds = ds.map(read_case, fn_kwargs={"ctx": ctx}, num_cpus=1)
    ds = ds.map_batches(
        CasePredictor,
        fn_constructor_kwargs={"checkpoint": [checkpoint_ref], "mode": job.predictor_mode, "chunk_points": job.chunk_points,
                               "recall_margin": job.recall_margin,
                               "threads": max(1, int(job.cpus_per_actor))},
        # Starts with every actor; may shrink to one, so a lost node slows the job instead of
        # leaving it waiting forever for an actor the cluster can no longer place.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors,
                                           max_tasks_in_flight_per_actor=2),
        batch_size=1,
        batch_format="numpy",
        zero_copy_batch=True,
        num_cpus=float(job.cpus_per_actor),
        num_gpus=gpus,
    )
    ds = ds.map(write_case, fn_kwargs={"ctx": ctx}, num_cpus=1)
    # A block lost to a crashed worker (e.g. killed for memory) must not end the job: the driver
    # reports the case as failed instead (see run_inference).
    ds.context.max_errored_blocks = -1
    yield from ds.iter_rows()


def _gpus_per_actor(requested: float | None, cluster_gpus: float, actors: int) -> float:
    """GPUs per actor: as requested, else one each, shared when there are more actors than GPUs.

    (With 1 GPU and 2 actors each gets 0.5: two models share the device instead of the second
    actor waiting forever for a GPU that never frees.)
    """
    if requested is not None:
        return float(requested)
    if cluster_gpus <= 0:
        return 0.0
    return min(1.0, cluster_gpus / max(1, actors))


def _write_report(layout: OutputLayout, rows: Iterable[CaseResult]) -> str:
    """``write_report``; a report that cannot be written (a full disk) is one error line, and
    the job goes on (the previous report, if any, stays whole: it is replaced atomically)."""
    try:
        return write_report(layout, rows)
    except OSError as exc:
        logger.error("infer: the report could not be written to %s: %s", layout.report_parquet,
                     " ".join(str(exc).split()))
        return layout.report_parquet


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_inference(job: InferJob, progress: Callable[[CaseResult], None] | None = None) -> InferReport:
    """Segment every case of ``job.input`` and write masks plus a report to ``job.output``.

    Args:
        job: the job; local paths are made absolute.
        progress: called with each case's result as it finishes (after the progress log line).

    Returns:
        The report (also written as ``report.parquet`` / ``report.csv``).

    Raises:
        ModelNotFoundError: the model spec names nothing (before any work).
        InferError: bad job field, unreadable input, or input channels that do not fit the model.
    """
    from ossnet.checkpoint import load_checkpoint
    from ossnet_pipelines.infer.stages import StageContext

    t_start = time.perf_counter()
    job = job.normalized()
    model_name, checkpoint = _model(job)
    model, info = load_checkpoint(io.BytesIO(checkpoint))
    spec, has_head, targets = info.preprocess, bool(model.config.has_lowres_head), model.config.targets
    del model
    multi = targets.kind != "binary"
    if multi and (job.save_probabilities or job.save_zarr):
        raise InferError(f"infer.save_probabilities/save_zarr: not available for the multi-target model {model_name} "
                         f"({targets.describe()}); it writes the label map (and --target-masks)")
    target_names = targets.names if multi and job.save_target_masks else ()
    sha = _digest(checkpoint)
    listing: CaseListing = list_cases(
        job.input, spec.modalities, layout=job.layout, labels=job.labels, split=job.split,
        volume_shape=spec.volume_shape, zscore_mask=spec.zscore_mask, storage_options=job.storage_options,
        exclude=job.output, resample=spec.resample,
    )
    layout = OutputLayout(job.output, job.storage_options)
    layout.prepare(job.save_probabilities, job.save_zarr, target_names)
    previous = read_report(layout)
    invalid = [c for c in listing.cases if c.error is not None]
    valid = {c.case_id: c for c in listing.cases if c.error is None}
    plan = plan_cases(list(valid), previous, layout.done_outputs(job.save_probabilities, job.save_zarr, target_names), sha,
                      job.overwrite)
    for cid, why in sorted(plan.redo_reasons.items()):
        logger.debug("infer: redoing %s (%s)", cid, why)
    mode = job.predictor_mode if job.predictor_mode != "auto" else ("mise_lowres" if has_head else "mise")
    logger.info("infer: %d cases in %s (%s layout): %d to do, %d already done, %d unreadable; model %s, mode %s",
                len(listing.cases), job.input, listing.layout, len(plan.todo), len(plan.skipped), len(invalid),
                model_name, mode)
    results: dict[str, CaseResult] = {r.case_id: r for r in plan.skipped}
    for case in invalid:
        results[case.case_id] = CaseResult(case.case_id, "failed", error=str(case.error), model=model_name,
                                           model_sha256=sha)
    ctx = StageContext(
        modalities=tuple(spec.modalities), volume_shape=tuple(spec.volume_shape), zscore_mask=spec.zscore_mask,
        outputs=layout, save_probabilities=job.save_probabilities, save_zarr=job.save_zarr, model=model_name,
        model_sha256=sha, source_options=job.storage_options, affine_atol=job.affine_atol,
        store_url=listing.store_url, store_channels=listing.store_channels, resample=spec.resample,
        target_spacing=spec.target_spacing, threshold=float(spec.threshold), targets=targets,
        save_target_masks=bool(target_names),
    )
    pipeline_seconds = 0.0
    actors, gpus = 0, 0.0
    report_path = _write_report(layout, results.values()) if not plan.todo else layout.report_parquet
    if plan.todo:
        import ray

        # the read tasks, the predictor actors and the write stage's tasks
        started = ensure_ray(min_cpus=int(job.actors) * float(job.cpus_per_actor) + 2, dashboard=False)
        try:
            actors = min(int(job.actors), len(plan.todo))
            gpus = _gpus_per_actor(job.gpus_per_actor, float(ray.cluster_resources().get("GPU", 0.0)), actors)
            tracker = CaseProgress("infer", len(plan.todo), job.progress_every)
            t0 = last_flush = time.perf_counter()
            todo = list(plan.todo)
            try:
                # A case whose block was lost with its worker or node comes back without a row: it
                # gets a second pass (on what is left of the cluster) before it counts as failed.
                for attempt in range(1 + LOST_CASE_RETRIES):
                    if attempt:
                        logger.warning("infer: %d case(s) lost with a worker or node; running them again: %s",
                                       len(todo), ", ".join(todo[:5]) + (" ..." if len(todo) > 5 else ""))
                    for row in _pipeline([valid[c] for c in todo], job, ctx, checkpoint, gpus):
                        result = CaseResult.from_row(row)
                        results[result.case_id] = result
                        tracker.update(result.status == "failed")
                        if progress is not None:
                            progress(result)
                        if time.perf_counter() - last_flush > job.report_every_s:
                            _write_report(layout, results.values())
                            last_flush = time.perf_counter()
                    todo = [c for c in plan.todo if c not in results]
                    if not todo:
                        break
            finally:
                tracker.close()
                pipeline_seconds = time.perf_counter() - t0
                # Whatever happened (Ctrl-C, a lost cluster), keep the record of finished cases.
                lost = [c for c in plan.todo if c not in results]
                report_path = _write_report(layout, results.values())
            for cid in lost:  # the pipeline dropped the case twice: its worker died (e.g. out of memory)
                results[cid] = CaseResult(cid, "failed", error=f"{cid}: no result from the pipeline (worker died, "
                                          "possibly out of memory; see the Ray logs)", model=model_name,
                                          model_sha256=sha)
            if lost:
                report_path = _write_report(layout, results.values())
        finally:
            if started:
                ray.shutdown()
        remove_stale_temps([layout.masks] + ([layout.probabilities] if job.save_probabilities else []),
                           job.storage_options)
    report = InferReport(
        output=job.output, cases=tuple(sorted(results.values(), key=lambda r: r.case_id)),
        seconds=time.perf_counter() - t_start, pipeline_seconds=pipeline_seconds, report_path=report_path,
        actors=actors, gpus_per_actor=gpus, extra={"layout": listing.layout, "model": model_name, "mode": mode},
    )
    logger.info("%s", report.summary())
    return report


__all__ = ["run_inference"]
