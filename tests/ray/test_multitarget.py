"""The regions quickstart end to end on the shared Ray session: BraTS-valued phantoms -> a
regions store -> a three-output model trained with Ray Train and registered -> batch inference
writing BraTS label maps, scored per region, with the per-region metrics in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from ossnet_pipelines.quickstart import QuickstartOptions, run_quickstart
from ossnet_pipelines.store import open_store


def test_the_regions_quickstart_writes_brats_label_maps_scored_per_region(ray_session: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ("model.preset=tiny", "sampling.n_points=512", "train.epochs=2", "train.batch_size=2",
                 "train.samples_per_case=1", "train.validate_every=1", "train.checkpoint_every=2",
                 "validation.max_cases=1", "data.object_store_mb=64", f"run.storage_path={tmp_path / 'ray'}",
                 "tracking.experiment=regions-test")
    result = run_quickstart(QuickstartOptions(out_dir=tmp_path / "qs", n_cases=5, n_heldout=2, task="regions",
                                              overrides=overrides, tracking_uri=uri))
    store = open_store(result.store)
    assert store.targets.names == ("wt", "tc", "et") and store.info["targets_name"] == "brats-regions"
    assert result.infer.ok and result.train.model_version is not None and result.model_name == "ossnet-regions"
    # Masks in the BraTS convention, in each held-out scan's own geometry.
    for case in result.infer.cases:
        written = np.asarray(nib.load(case.mask.removeprefix("file://")).dataobj)
        reference = nib.load(str(tmp_path / "qs" / "heldout" / case.case_id / f"{case.case_id}_seg.nii.gz"))
        assert written.shape == reference.shape and set(np.unique(written)) <= {0, 1, 2, 4}
        assert {k for k in json.loads(case.targets) if k.startswith("dice_")} == {"dice_wt", "dice_tc", "dice_et"}
    frame = pd.read_parquet(result.infer.report_path.removeprefix("file://"))
    assert {"dice_wt", "dice_tc", "dice_et", "hd95_et"} <= set(frame.columns)
    assert set(result.window_dice) == {"wt", "tc", "et"}
    assert all(set(cases) == {c.case_id for c in result.infer.cases} for cases in result.window_dice.values())
    # Per-region validation metrics and the points each region got, in the training run.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    metrics = client.get_run(result.train.mlflow_run_id).data.metrics
    assert {"val_dice_wt", "val_dice_et", "val_global_dice_tc", "val_hd95_wt", "train_points_et"} <= set(metrics)
    points = [metrics[f"train_points_{name}"] for name in ("wt", "tc", "et")]
    assert points == sorted(points, reverse=True) and points[0] > 0  # nested: the inner regions hold fewer
    assert len(client.search_model_versions("name='ossnet-regions'")) == 1
