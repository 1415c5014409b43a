"""End to end: ``ossnet train --address`` submits a 2-worker CPU training job to the local
multi-node cluster through the Jobs API; the job tracks into a real MLflow server.

Run alone (never next to tests/ray's Ray instance): ``pytest tests/e2e/test_train_cluster.py -m slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_phantom_store

if TYPE_CHECKING:
    from conftest import LocalCluster, MlflowServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 1200


def _artifacts(client: object, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):  # type: ignore[attr-defined]
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_train_job_submitted_to_the_cluster_tracks_and_registers(
    local_cluster: LocalCluster, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    store = write_phantom_store(tmp_path, (700, 701, 702, 703, 715), test_fraction=0.2)  # 715: the test case
    (val_case,) = open_store(store).case_ids("val")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"store: {store}\n"
        "model: {variant: C, preset: tiny}\n"
        "sampling: {n_points: 256}\n"
        "train: {epochs: 2, batch_size: 2, lr: 1.0e-3}\n"
        "validation: {chunk_points: 4096}\n"
        "data: {object_store_mb: 64}\n"
        "scaling: {num_workers: 2, resources_per_worker: {CPU: 1}, max_failures: 0}\n"
        f"run: {{name: e2e-train, storage_path: {tmp_path / 'ray_results'}}}\n"
        "tracking: {experiment: e2e-train, model_name: ossnet-e2e}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(local_cluster.client_env, MLFLOW_TRACKING_URI=mlflow_server.uri)
    proc = subprocess.run(
        [sys.executable, "-m", "ossnet_cli", "train", "--config", str(config), "--address", local_cluster.address],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "submitting run e2e-train" in proc.stdout
    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", proc.stdout)
    assert run_id, proc.stdout[-4000:]
    version = re.search(r"model ossnet-e2e v(\d+) \([0-9.]+\) is now 'champion'", proc.stdout)
    assert version, proc.stdout[-4000:]

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    run = client.get_run(run_id.group(1))
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["model.preset"] == "tiny"
    for metric in ("train_loss", "train_point_acc", "val_dice", "val_iou", "val_lowres_dice", "points_per_s"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == [1, 2], (metric, steps)
    assert run.data.metrics["train_volumes"] == 2  # 3 train rows split equally over 2 workers
    artifacts = _artifacts(client, run.info.run_id)
    assert "config/train.resolved.yaml" in artifacts
    assert {f"validation/epoch_0001/{val_case}.png", f"validation/epoch_0002/{val_case}.png"} <= artifacts

    registered = client.get_model_version("ossnet-e2e", version.group(1))
    assert registered.run_id == run.info.run_id and registered.status == "READY"
    assert int(client.get_registered_model("ossnet-e2e").aliases["champion"]) == int(version.group(1))
    assert 0.0 <= float(registered.tags["val_dice"]) <= 1.0
    assert float(registered.tags["test_dice"]) == pytest.approx(run.data.metrics["test_dice"])
    # The model bundle and the checkpoints went where they should: the server's artifact store
    # and the run's Ray Train storage.
    assert list((mlflow_server.home / "mlartifacts").rglob("checkpoint.pt"))
    assert sorted(p.name for p in (tmp_path / "ray_results" / "e2e-train").glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0001", "checkpoint_epoch_0002"]
