"""Resuming training from damaged or foreign checkpoints (``ossnet_pipelines.train.state``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ossnet.checkpoint import PreprocessSpec
from ossnet.config import model_config
from ossnet.model import build_model
from ossnet.training import make_optimizer, make_scheduler
from ossnet_pipelines.train.state import (
    MODEL_FILE,
    STATE_FILE,
    LocalCheckpoints,
    ResumeError,
    restore_first_good,
    write_checkpoint,
)


def _fresh(variant: str = "C"):
    model = build_model(model_config(variant, "tiny"))
    optimizer = make_optimizer(model, "adam")
    return model, optimizer, make_scheduler(optimizer)


def _write(local: LocalCheckpoints, epoch: int, variant: str = "C") -> Path:
    model, optimizer, scheduler = _fresh(variant)
    spec = PreprocessSpec(modalities=("a", "b", "c", "d"), volume_shape=model.config.volume_shape)
    return write_checkpoint(local.path_for(epoch), model, optimizer, scheduler, None, epoch=epoch, seed=0,
                            metrics={"epoch": epoch, "val_dice": 0.1 * epoch}, preprocess=spec, run_name="r")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = LocalCheckpoints(tmp_path, keep=3)
    for epoch in (1, 2, 3):
        _write(local, epoch)
    latest = local.path_for(3) / MODEL_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated mid-write
    with caplog.at_level(logging.WARNING):
        restored = restore_first_good(local.newest_first(), *_fresh(), None)
    assert restored is not None and restored.epoch == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint_epoch_0003" in w and "trying the previous one" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)

    # A damaged optimiser state and a foreign checkpoint (another model config) are skipped too.
    (local.path_for(2) / STATE_FILE).write_bytes(b"not a torch file")
    _write(local, 4, variant="D")
    restored = restore_first_good(local.newest_first(), *_fresh(), None)
    assert restored is not None and restored.epoch == 1


def test_no_restorable_checkpoint_is_one_clear_error_and_no_checkpoint_starts_afresh(tmp_path: Path) -> None:
    local = LocalCheckpoints(tmp_path, keep=3)
    assert restore_first_good(local.newest_first(), *_fresh(), None) is None
    _write(local, 1)
    _write(local, 2, variant="D")
    (local.path_for(1) / MODEL_FILE).write_bytes(b"")
    with pytest.raises(ResumeError) as err:
        restore_first_good(local.newest_first(), *_fresh(), None)
    message = str(err.value)
    assert "\n" not in message and "checkpoint_epoch_0002" in message and "checkpoint_epoch_0001" in message
    assert "another model config" in message
