"""Jobs killed with SIGKILL at a random point, then run again with the same command.

The second run must complete the work as if the first had never been interrupted: ingest
leaves every case once and equal to a clean ingest, batch inference writes every mask once and
equal to a clean run, training ends with each epoch once in MLflow's metric history. No
temporary file survives. The kill point is drawn from a seeded generator after the job has
visibly made progress, so each run is reproducible and the job is always killed mid-way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DenseReference, process_group
from ossnet.phantoms import brats_like
from ossnet_pipelines.files import TMP_SUFFIX
from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_brats_archive, write_phantom_store

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
RNG = random.Random(14)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}


def _ossnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "ossnet_cli", *args]


def _kill_after(command: list[str], marker: str, max_delay_s: float) -> str:
    """Run ``command``; once ``marker`` appears in its output, wait a random delay and SIGKILL
    the driver process (only it, as the OOM killer would). Returns the output."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
        assert time.monotonic() < deadline, "".join(lines)[-4000:]
    else:
        pytest.fail(f"{marker!r} never appeared:\n{''.join(lines)[-4000:]}")
    time.sleep(RNG.uniform(0.0, max_delay_s))
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    log = "".join(lines) + rest
    assert proc.returncode == -signal.SIGKILL, f"the job ended before the kill:\n{log[-4000:]}"
    time.sleep(2.0)  # Ray's own processes follow their driver; clear any that did not
    for pid in process_group(proc.pid):
        os.kill(pid, signal.SIGKILL)
    return log


def _run(command: list[str], what: str = "") -> str:
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    if what:  # the time to recover, for the record (pytest -rP shows it)
        print(f"[recovery] {what}: {time.monotonic() - start:.1f} s")
    return proc.stdout + proc.stderr


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX) or p.name.startswith(".download-")]


def test_a_killed_ingest_run_again_equals_a_clean_ingest(tmp_path: Path) -> None:
    cases = [brats_like((37, 41, 29), seed=s, case_id=f"brats-{s}") for s in range(10)]
    archive = write_brats_archive(cases, tmp_path / "archive")
    args = ["--preset", "tiny", "--executor", "serial"]
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    _kill_after(_ossnet("ingest", str(archive), "--store", str(killed), *args), "ingest: 3/10 cases", 1.0)
    _run(_ossnet("ingest", str(archive), "--store", str(killed), *args), "ingest killed, run again")
    _run(_ossnet("ingest", str(archive), "--store", str(clean), *args))
    a, b = open_store(str(killed)), open_store(str(clean))
    assert a.manifest == b.manifest and len(a.manifest) == 10
    for case_id in a.case_ids():
        assert a.case_attrs(case_id)["complete"] is True
        left, right = a.read_case(case_id), b.read_case(case_id)
        for name in right:
            np.testing.assert_array_equal(left[name], right[name], err_msg=f"{case_id}/{name}")
    assert not _temporaries(killed)


def test_a_killed_inference_run_again_writes_every_mask_once(dense_reference: DenseReference, tmp_path: Path) -> None:
    scans = dense_reference.subset(tmp_path / "scans", 12)
    # A progress line per case, so that the kill lands after a known case.
    flags = ["--model", str(dense_reference.checkpoint), "--actors", "1", "--mode", "dense",
             "--set", "progress_every=1"]
    killed = tmp_path / "killed"
    _kill_after(_ossnet("infer", str(scans), "--output", str(killed), *flags), "infer: 4/12 cases", 0.5)
    _run(_ossnet("infer", str(scans), "--output", str(killed), *flags), "inference killed, run again")
    names = dense_reference.assert_same_masks(killed / "masks")
    assert names == sorted(p.name for p in scans.iterdir())
    import pandas as pd

    report = pd.read_parquet(killed / "report.parquet")
    assert sorted(report["case_id"]) == [n.removesuffix(".nii.gz") for n in names]
    assert set(report["status"]) <= {"ok", "skipped"} and report["case_id"].is_unique
    assert not _temporaries(killed)


def test_a_killed_training_run_again_logs_every_epoch_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    epochs = 5
    store = write_phantom_store(tmp_path / "data", (700, 701, 702, 703, 715), test_fraction=0.2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "train.yaml"
    config.write_text(
        f"store: {store}\n"
        "model: {variant: C, preset: tiny}\n"
        "sampling: {n_points: 256}\n"
        f"train: {{epochs: {epochs}, batch_size: 2, lr: 1.0e-3, validate_every: 1, checkpoint_every: 1}}\n"
        "validation: {chunk_points: 4096, png_cases: 0}\n"
        "data: {object_store_mb: 64}\n"
        "scaling: {num_workers: 0}\n"
        f"run: {{name: killed, storage_path: {tmp_path / 'runs'}}}\n"
        f"tracking: {{uri: '{uri}', experiment: killed, model_name: killed}}\n"
    )
    command = _ossnet("train", "--config", str(config))
    _kill_after(command, f"epoch {RNG.randint(1, 3)}/{epochs}:", 1.5)
    _run(command, "training killed, run again")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "FINISHED"
    for metric in ("train_loss", "val_dice", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)
    assert len(client.search_model_versions("name = 'killed'")) == 1
    assert not _temporaries(tmp_path / "runs")
