"""The tracking server goes away in the middle of a training job, for real.

A training job runs against its own ``mlflow/server.sh``; the server is killed (SIGKILL) after
the first epoch reaches it. Training must go on and checkpoint every epoch, say so once, and
end with one line saying to run the same command again. With the server back (same data, same
port), that second run trains nothing and leaves MLflow as if nothing had happened: every epoch
logged once, the model logged and registered once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, start_mlflow_server, stop_mlflow_server
from ossnet_pipelines.synthetic import write_phantom_store

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4  # the outage lands after epoch 1: three epochs run without the server
JOB_TIMEOUT_S = 900


def _first_epoch_logged(uri: str, experiment: str) -> bool:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id])
    return bool(runs) and "train_loss" in runs[0].data.metrics


def test_training_survives_a_lost_tracking_server_and_a_rerun_reconciles(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = write_phantom_store(tmp_path / "data", (700, 701, 702, 703, 715), test_fraction=0.2)
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"store: {store}\n"
        "model: {variant: C, preset: tiny}\n"
        "sampling: {n_points: 256}\n"
        f"train: {{epochs: {EPOCHS}, batch_size: 2, lr: 1.0e-3, validate_every: 1, checkpoint_every: 1, "
        "keep_checkpoints: 1}\n"
        "validation: {chunk_points: 4096, png_cases: 0}\n"
        "data: {object_store_mb: 64}\n"
        "scaling: {num_workers: 0}\n"
        f"run: {{name: outage, storage_path: {tmp_path / 'runs'}}}\n"
        f"tracking: {{uri: '{server.uri}', experiment: outage, model_name: outage}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    command = [sys.executable, "-m", "ossnet_cli", "train", "--config", str(config)]
    try:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not _first_epoch_logged(server.uri, "outage"):
            assert proc.poll() is None, proc.stdout.read()[-6000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the first epoch never reached MLflow"
            time.sleep(0.3)
        stop_mlflow_server(server, hard=True)
        log, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
        assert proc.returncode == 1, log[-6000:]
        assert log.count("is unreachable (") == 1, log[-6000:]  # once, not once per epoch
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and server.uri in errors[0] and "run the same command again" in errors[0], errors
        # Training went on to the end and kept checkpointing.
        kept = sorted(p.name for p in (tmp_path / "runs" / "outage" / "local").glob("checkpoint_epoch_*"))
        assert kept[-1] == f"checkpoint_epoch_{EPOCHS:04d}", kept

        server = start_mlflow_server(tmp_path / "mlflow", port)  # the same data comes back
        start = time.monotonic()
        again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=JOB_TIMEOUT_S, check=False)
        print(f"[recovery] tracking server back, training run again: {time.monotonic() - start:.1f} s")
        assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        for metric in ("train_loss", "val_dice", "lr"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (metric, steps)  # each epoch once
        versions = client.search_model_versions("name = 'outage'")
        assert len(versions) == 1 and run.data.tags["ossnet.model_version"] == str(versions[0].version)
        assert int(client.get_registered_model("outage").aliases["champion"]) == int(versions[0].version)
    finally:
        stop_mlflow_server(server)
