"""Ingest NIfTI archives (BraTS 2020, LiTS, generic) into an ossnet Zarr store, in parallel.

``ingest(IngestJob(...)) -> IngestReport`` is the API; ``ossnet ingest`` is the command. Modules:

* ``sources``: discovery of the cases of an archive (layouts, split files, fsspec sources);
* ``case``: the unit of parallel work, one case onto the model grid into the store;
* ``job``: ``IngestJob`` (checked fields) and ``IngestReport``;
* ``executors``: where cases run (this process, a local process pool, Ray tasks);
* ``driver``: ``ingest``: skip finished cases, run the rest, assign splits, publish the manifest;
* ``cli``: the ``ossnet ingest`` parser and command.

Memory: a case streams its channels slab by slab (``ossnet_pipelines.volumes``), so a scan larger than
memory ingests in bounded memory (``ossnet_bench.ingest``). Parallelism: with ``workers > 1`` cases run
as Ray tasks when a Ray cluster is up (``ray.init`` already called or ``RAY_ADDRESS`` set), so an
ingest spreads over the nodes, each task asking Ray for the memory one case needs; otherwise in
a local process pool (no cluster start-up for a laptop ingest). Cases are independent and write
disjoint groups; one task per case keeps a failure (or an OOM kill, retried by Ray) confined to
its case. The driver alone writes the manifest, after every case has finished.
"""

from __future__ import annotations

from ossnet_pipelines.ingest.case import CaseContext, CaseError, CaseReport, ingest_case
from ossnet_pipelines.ingest.cli import configure_ingest_parser, job_from_args, run_ingest_cli
from ossnet_pipelines.ingest.driver import ingest, seeded_split
from ossnet_pipelines.ingest.job import EXECUTORS, IngestJob, IngestReport
from ossnet_pipelines.ingest.sources import LAYOUTS, IngestError

__all__ = [
    "EXECUTORS",
    "LAYOUTS",
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
