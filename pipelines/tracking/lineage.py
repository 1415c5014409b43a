"""Which data a run used: the store as an MLflow dataset input (``mlflow.log_input`` semantics).

A training run (and a sweep's parent run) records its store as a dataset: the store's URL as the
source, a content digest and the number of cases per split as its profile. The digest covers
the grid settings, every published case's split and the sha256 of each of its source files, so
two runs with the same digest trained on the same scans, split the same way; a re-ingest that
changes any scan, label or split changes it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ossnet_pipelines.store import Store
    from ossnet_pipelines.tracking.runs import RunLogger

#: The store settings that change what a model learns from the same scans.
_DIGESTED_INFO = ("preset", "volume_shape", "modalities", "zscore_mask", "resample", "target_spacing", "band_width",
                  "targets", "orientation")


def store_digest(store: "Store") -> str:
    """16 hex digits over the store's grid settings, case splits and source-file checksums."""
    manifest = store.manifest
    scanned = store.scan_cases()
    cases = {}
    for case_id, split in sorted(manifest.items()):
        sources = scanned.get(case_id, {}).get("sources", {})
        cases[case_id] = {"split": split,
                          "sources": {k: v.get("sha256") or v.get("size") for k, v in sorted(sources.items())}}
    content = {"info": {k: store.info.get(k) for k in _DIGESTED_INFO}, "cases": cases}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_counts(store: "Store") -> dict[str, int]:
    """Published cases per split."""
    counts: dict[str, int] = {}
    for split in store.manifest.values():
        counts[split] = counts.get(split, 0) + 1
    return dict(sorted(counts.items()))


def store_dataset(store_url: str) -> Any:
    """The store as an ``mlflow.data`` dataset: source URL, name, digest, per-split case counts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from ossnet_pipelines.store import open_store

    store = open_store(store_url)
    counts = split_counts(store)

    profile = {"cases_per_split": counts, "cases": sum(counts.values()), "volume_shape": list(store.volume_shape),
               "modalities": list(store.modalities)}

    class StoreDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    name = PurePosixPath(store_url.rstrip("/")).name or store_url
    with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either is it
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        source = resolve_dataset_source(store_url)
    return StoreDataset(source, name=name, digest=store_digest(store))


def log_store_input(run: "RunLogger", store_url: str, context: str = "training") -> Any:
    """Record the store as a dataset input of ``run`` (tagged ``mlflow.data.context``); returns it."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = store_dataset(store_url)
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    run.client.log_inputs(run.run_id, datasets=[entity])
    return dataset


__all__ = ["log_store_input", "split_counts", "store_dataset", "store_digest"]
