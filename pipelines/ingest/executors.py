"""Where cases run: in this process, a local process pool, or Ray tasks (one per case)."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Iterator, Sequence

from ossnet_pipelines.ingest.case import CaseContext, CaseReport, ingest_case, one_line
from ossnet_pipelines.ingest.job import IngestJob
from ossnet_pipelines.ingest.sources import CaseSpec, IngestError
from ossnet_pipelines.raystart import ensure_ray

logger = logging.getLogger(__name__)


def run_serial(specs: Sequence[CaseSpec], ctx: CaseContext) -> Iterator[CaseReport]:
    for spec in specs:
        yield ingest_case(spec, ctx)


def run_process(specs: Sequence[CaseSpec], ctx: CaseContext, workers: int) -> Iterator[CaseReport]:
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


def run_ray(specs: Sequence[CaseSpec], ctx: CaseContext, workers: int) -> Iterator[CaseReport]:
    import ray

    ensure_ray(min_cpus=workers, dashboard=False, log_to_driver=False)
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


def choose_executor(job: IngestJob, n_todo: int) -> str:
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


__all__ = ["choose_executor", "run_process", "run_ray", "run_serial"]
