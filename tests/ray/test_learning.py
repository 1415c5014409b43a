"""Does training learn, and does it say when it does not? Both through ``ossnet_pipelines.train.train``,
the loop ``ossnet train`` runs, on hard phantoms (no intensity window solves them).

* Overfit: one hard BraTS-like case, validated on itself, must reach Dice >= 0.95.
* Collapse guard: a model trained on a case without lesion predicts nothing on a case with one;
  the loop must warn and tag the MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ossnet.baselines.window import best_window
from ossnet.phantoms import brats_hard, phantom_dataset
from ossnet_pipelines.jobconfig import load_job
from ossnet_pipelines.synthetic import write_case_store
from ossnet_pipelines.train import TrainJob, train
from ossnet_pipelines.train.validation import COLLAPSE_TAG

pytestmark = pytest.mark.ray


def _job(store: str, tmp: Path, name: str, **overrides: Any) -> TrainJob:
    base: dict[str, Any] = {
        "store": store, "model.variant": "C", "sampling.n_points": 1024, "train.batch_size": 2,
        "train.lr": 1e-3, "train.milestones": [1000], "train.seed": 0, "validation.chunk_points": 8192,
        "data.object_store_mb": 128, "scaling.num_workers": 0, "run.storage_path": str(tmp / "ray_results"),
        "run.name": name, "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "tracking.experiment": "learning",
        "tracking.register": False,
    }
    base.update(overrides)
    return load_job(TrainJob, None, list(base.items()))


def _tags(job: TrainJob, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=job.tracking.uri).get_run(run_id).data.tags


def test_train_loop_overfits_one_hard_case(ray_session: Any, tmp_path: Path) -> None:
    case = phantom_dataset("brats", 1, shape=(64, 64, 48), seed=0, level="hard")[0]
    window = best_window(case.image, case.label).dice
    assert window < 0.7  # a case a threshold does not solve
    store = write_case_store(tmp_path / "data", [case], preset="small", splits={case.case_id: "train"})
    job = _job(store, tmp_path, "overfit", **{
        "model.preset": "small", "sampling.border_ratio": 0.5, "augment.p_flip": 0.0,
        "augment.p_brightness": 0.0, "augment.p_noise": 0.0, "train.epochs": 10, "train.samples_per_case": 40,
        "train.validate_every": 10, "train.checkpoint_every": 10, "validation.split": "train",
    })
    result = train(job)
    assert result.metrics["val_cases"] == 1
    assert result.best_val_dice >= 0.95, (result.best_val_dice, window)
    assert 0.8 < result.metrics["val_pred_ratio"] < 1.25
    assert COLLAPSE_TAG not in _tags(job, result.mlflow_run_id)


def test_collapse_guard_warns_and_tags_the_run(
    ray_session: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = brats_hard((37, 41, 29), seed=1, empty=True, case_id="no-lesion")
    lesion = brats_hard((37, 41, 29), seed=2, case_id="lesion")
    assert not empty.label.any() and lesion.label.any()
    store = write_case_store(tmp_path / "data", [empty, lesion], preset="tiny",
                             splits={"no-lesion": "train", "lesion": "val"})
    job = _job(store, tmp_path, "collapse", **{
        "model.preset": "tiny", "train.epochs": 2, "train.samples_per_case": 8, "validation.mode": "dense",
    })
    with caplog.at_level(logging.WARNING, logger="ossnet_pipelines.train.loop"):
        result = train(job)
    assert result.metrics["val_dice"] == 0.0 and result.metrics["val_pred_ratio"] < 0.1
    warnings = [r.getMessage() for r in caplog.records if "almost no foreground" in r.getMessage()]
    assert warnings and "epoch 2" in warnings[-1]
    tag = _tags(job, result.mlflow_run_id)[COLLAPSE_TAG]
    assert tag.startswith("epoch 2: ") and "reference" in tag
