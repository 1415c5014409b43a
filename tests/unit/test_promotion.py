"""Promotion on the store's test split (``ossnet_pipelines.train.promotion``), on a real SQLite
MLflow store and a real phantom store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ossnet.checkpoint import PreprocessSpec, save_checkpoint
from ossnet.config import model_config
from ossnet.model import build_model
from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_phantom_store
from ossnet_pipelines.tracking import RunLogger
from ossnet_pipelines.train.promotion import TestSet, register_on_test_evidence


def _logged_model(root: Path, uri: str, name: str, in_channels: int, volume_shape: tuple[int, int, int]) -> str:
    torch.manual_seed(0)
    model = build_model(model_config("C", "tiny", in_channels=in_channels, volume_shape=volume_shape)).eval()
    spec = PreprocessSpec(modalities=tuple(f"m{i}" for i in range(in_channels)), volume_shape=volume_shape)
    ckpt = save_checkpoint(root / f"{name}.pt", model, spec)
    with RunLogger(name, experiment="promotion-test", tracking_uri=uri) as run:
        return run.log_model_bundle(ckpt, name="model").model_uri


def test_the_test_split_decides_and_a_model_that_cannot_be_scored_is_kept_unpromoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("OSSNET_HOME", str(tmp_path / "home"))
    store_url = write_phantom_store(tmp_path / "data", (1, 2, 3, 4), test_fraction=0.25)
    store = open_store(store_url)
    test_set = TestSet.of(store_url, store.case_ids("test"))
    assert len(test_set.case_ids) == 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    shape = tuple(store.volume_shape)
    fits = _logged_model(tmp_path, uri, "fits", len(store.modalities), shape)
    first = register_on_test_evidence(fits, model_name="m", val_dice=0.7, test_set=test_set, tracking_uri=uri,
                                      mode="dense", chunk_points=4096)
    assert first.test is not None and 0.0 <= first.test.dice <= 1.0 and first.promoted and first.version == 1
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version("m", "1").tags
    assert float(tags["val_dice"]) == 0.7 and float(tags["test_dice"]) == pytest.approx(first.test.dice)
    assert tags["ossnet.test_set"] == test_set.digest and tags["ossnet.test_cases"] == "1"
    assert "highest test Dice on the 1 test cases" in tags["ossnet.promotion"]

    # One input channel for a four-modality store: it cannot be scored, so it is registered
    # without a promotion score, the champion stays, and the reason is in the line.
    wrong = _logged_model(tmp_path, uri, "wrong", 1, shape)
    second = register_on_test_evidence(wrong, model_name="m", val_dice=0.99, test_set=test_set, tracking_uri=uri,
                                       mode="dense", chunk_points=4096)
    assert second.test is None and not second.promoted and second.version == 2
    assert "could not be scored" in second.message and "1 input channels" in second.message
    assert int(client.get_registered_model("m").aliases["champion"]) == 1

    # A store without a test split registers and never promotes, whatever the validation Dice.
    third = register_on_test_evidence(fits, model_name="other", val_dice=0.99, test_set=None, tracking_uri=uri)
    assert not third.promoted and "has no test split" in third.message
    assert "champion" not in client.get_registered_model("other").aliases
