"""The quickstart rebuilds its own store when an older ossnet wrote it, instead of failing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ossnet.phantoms import brats_like
from ossnet_pipelines.ingest import IngestError, IngestJob, ingest
from ossnet_pipelines.quickstart import ingest_own_store
from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_brats_archive


def test_an_incompatible_quickstart_store_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = write_brats_archive([brats_like((24, 24, 16), seed=s, case_id=f"c{s}") for s in range(2)],
                                  tmp_path / "archive")
    store = str(tmp_path / "store.zarr")
    old = IngestJob(source=str(archive), store=store, layout="brats", preset="tiny", volume_shape=(16, 16, 16),
                    val_fraction=0.5, executor="serial")
    assert ingest(old).ok
    new = IngestJob(source=str(archive), store=store, layout="brats", preset="tiny", volume_shape=(24, 24, 16),
                    val_fraction=0.5, executor="serial")
    with pytest.raises(IngestError, match="existing store"):
        ingest(new)  # a user's own store is never replaced silently
    with caplog.at_level(logging.WARNING, logger="ossnet_pipelines.quickstart"):
        report = ingest_own_store(new)
    assert report.ok and report.count("ingested") == 2
    assert open_store(store, "r").volume_shape == (24, 24, 16)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
