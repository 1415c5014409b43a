"""A hyperparameter sweep on the shared session cluster, interrupted and resumed through the CLI.

One sweep of four trials on a tiny synthetic store (preset "tiny", 32x32x24; 37x41x29 sources,
three train cases, one validation case; 256 points; 3 epochs; each trial a Ray Train run in
local mode inside its Tune actor with half a CPU, its epochs reaching ASHA through
``TuneReportCallback``) runs as ``ossnet tune`` in a subprocess that joins the session's Ray
cluster. The test
kills that driver once Tune has recorded a finished trial, then resumes the sweep with
``ossnet tune --resume`` and checks the outcome:

- the four trials are ``sweep.points_to_evaluate``: two with a high learning rate learn within
  the first epoch; the third (learning rate 1e-5) does not, so ASHA, comparing it with the
  first two at epoch 1, stops it (also after the resume: the rungs are rebuilt); the fourth
  fails (a trial hook, ``failing_trial_sweep.py``) and the sweep goes on;
- the trial that had finished before the kill is not run again;
- the printed and saved summary, the MLflow parent and child runs and the registry agree,
  and ``champion`` points to the best trial's model.

Running the drivers as subprocesses also keeps the session cluster clean: resources held by
trials that Tune stopped are released when their driver's job ends.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ossnet_pipelines.synthetic import write_phantom_store

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
SWEEP = "tune-test"
MODEL_NAME = "tune-test-model"
# Phantom seeds with lesions of 5-8 % of the volume: a few steps learn them.
SEEDS = (509, 525, 530, 506)
TEST_SEED = 536  # the store's one test case (the seeded split keeps the validation case of SEEDS)
GOOD = {"aux_loss": True, "alpha": 0.1, "patch_size": 3, "border_ratio": 0.5, "band_width": 4, "lr": 0.02}
GOOD2 = {**GOOD, "patch_size": "3+6", "border_ratio": 0.3, "band_width": 3, "lr": 0.025}
WEAK_LR, FAILING_LR = 1e-5, 0.0123
START_TIMEOUT_S = 600
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class SweepRun:
    """What the interrupted-then-resumed sweep left behind."""

    config: dict[str, Any]
    experiment_path: Path
    tracking_uri: str
    finished_before_kill: dict[str, int]  # trial id -> result rows at the kill
    checkpoints_before_kill: dict[str, dict[str, float]]  # trial id -> checkpoint dir -> mtime
    stdout: str
    wall_s: dict[str, float]


def _config(store: str, root: Path) -> dict[str, Any]:
    return {
        "store": store,
        "model": {"variant": "C", "preset": "tiny"},
        "sampling": {"n_points": 256},
        "train": {"epochs": EPOCHS, "batch_size": 1, "samples_per_case": 12, "milestones": [50],
                  "validate_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1},
        "validation": {"mode": "dense", "chunk_points": 32768, "png_cases": 0},
        "data": {"cpus_per_task": 0.25, "object_store_mb": 64},
        "scaling": {"num_workers": 0, "resources_per_worker": {"CPU": 0.5}, "max_failures": 0},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tune-tests", "model_name": MODEL_NAME},
        "space": {"alpha": {"low": 0.01, "high": 1.0, "zero": True}, "patch_size": [3, "3+6"],
                  "border_ratio": {"low": 0.0, "high": 0.9}, "band_width": {"low": 2, "high": 6},
                  "lr": {"low": 1e-5, "high": 3e-2}},
        "sweep": {"name": SWEEP, "num_samples": 4, "seed": 0, "startup_trials": 4, "trial_cpus": 0.25,
                  "max_concurrent_trials": 2, "storage_path": str(root / "tune"),
                  "points_to_evaluate": [GOOD, GOOD2, {**GOOD, "lr": WEAK_LR}, {**GOOD, "lr": FAILING_LR}]},
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
    }


def _env(ray_session: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _finished(experiment_path: Path) -> dict[str, int]:
    """Trials Tune has saved as TERMINATED, with their number of result rows."""
    import logging

    from ray.tune import ExperimentAnalysis

    # Trials that have not reported yet have no result files: expected while polling.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if not list(experiment_path.glob("experiment_state-*.json")):
        return {}
    try:
        analysis = ExperimentAnalysis(str(experiment_path))
    except Exception:  # noqa: BLE001 - the state file may be mid-write; poll again
        return {}
    frames = analysis.trial_dataframes
    return {t.trial_id: len(frames.get(t.trial_id, [])) for t in analysis.trials if t.status == "TERMINATED"}


def _checkpoints(experiment_path: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for run_dir in (experiment_path / "trials").glob(f"{SWEEP}-*"):
        out[run_dir.name.rsplit("-", 1)[-1]] = {c.name: c.stat().st_mtime for c in run_dir.glob("checkpoint_*")}
    return out


@pytest.fixture(scope="module")
def sweep_run(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    root = tmp_path_factory.mktemp("tune")
    config = _config(write_phantom_store(root, (*SEEDS, TEST_SEED), test_fraction=0.2), root)
    config_path = root / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    experiment_path = root / "tune" / SWEEP
    cmd = [sys.executable, str(Path(__file__).with_name("failing_trial_sweep.py")), repr(FAILING_LR), "tune",
           "--config", str(config_path)]
    env = _env(ray_session)
    log = (root / "first.log").open("w")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished: dict[str, int] = {}
    try:
        while not finished:
            if proc.poll() is not None:
                pytest.fail(f"the sweep exited ({proc.returncode}) before it was interrupted:\n"
                            + (root / "first.log").read_text()[-4000:])
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail("no trial finished in time:\n" + (root / "first.log").read_text()[-4000:])
            time.sleep(2)
            finished = _finished(experiment_path)
        checkpoints = _checkpoints(experiment_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its Ray job and trials go with it
        proc.wait()
        log.close()
    killed_at = time.monotonic()
    resumed = subprocess.run([*cmd, "--resume"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    (root / "resume.out").write_text(resumed.stdout)
    (root / "resume.err").write_text(resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return SweepRun(
        config=config, experiment_path=experiment_path, tracking_uri=config["tracking"]["uri"],
        finished_before_kill=finished, checkpoints_before_kill=checkpoints, stdout=resumed.stdout,
        wall_s={"first": killed_at - start, "resume": time.monotonic() - killed_at},
    )


def _summary(run: SweepRun) -> list[dict[str, str]]:
    import csv

    with (run.experiment_path / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _client(run: SweepRun) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)


def _runs(run: SweepRun) -> tuple[Any, dict[str, Any]]:
    client = _client(run)
    experiment = client.get_experiment_by_name("tune-tests")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`ossnet.run_key` = '{SWEEP}'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.data.tags["ossnet.tune.trial_id"]: c for c in children}


# --------------------------------------------------------------------------- the tests


def _by_lr(run: SweepRun) -> dict[float, dict[str, str]]:
    return {float(r["lr"]): r for r in _summary(run)}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep_run: SweepRun) -> None:
    assert sweep_run.finished_before_kill, "the sweep was killed before any trial finished"
    after = _finished(sweep_run.experiment_path)
    rows = {r["trial"]: r for r in _summary(sweep_run)}
    for trial_id, n_rows in sweep_run.finished_before_kill.items():
        assert after[trial_id] == n_rows  # no new results: the trial did not run again
        assert _checkpoints(sweep_run.experiment_path)[trial_id] == sweep_run.checkpoints_before_kill[trial_id]
        assert rows[trial_id]["status"] in ("completed", "early_stopped")
    # Every point ran (or failed) once: four trials, no duplicates from the restart.
    assert sorted(_by_lr(sweep_run)) == sorted([GOOD["lr"], GOOD2["lr"], WEAK_LR, FAILING_LR]) and len(rows) == 4
    print(f"sweep wall time: {sweep_run.wall_s}")


def test_asha_stops_the_weak_trial_and_the_failed_trial_is_recorded(sweep_run: SweepRun) -> None:
    rows = _by_lr(sweep_run)
    weak, failed = rows[WEAK_LR], rows[FAILING_LR]
    assert weak["status"] == "early_stopped" and int(weak["epochs"]) < EPOCHS
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    ranked = _summary(sweep_run)
    completed = [r for r in ranked if r["status"] == "completed"]
    assert completed and all(r["epochs"] == str(EPOCHS) for r in completed)
    assert float(completed[0]["val_dice"]) > float(weak["val_dice"] or 0)
    assert [r["rank"] for r in ranked] == ["1", "2", "3", "4"] and ranked[-1]["status"] == "failed"
    scores = [float(r["val_dice"]) for r in ranked if r["val_dice"]]
    assert scores == sorted(scores, reverse=True)
    header = (sweep_run.experiment_path / "summary.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["rank", "trial", "status"]
    assert {rows[GOOD["lr"]]["status"], rows[GOOD2["lr"]]["status"]} <= {"completed", "early_stopped"}


def test_best_trial_and_score_match_the_mlflow_child_runs(sweep_run: SweepRun) -> None:
    client = _client(sweep_run)
    parent, children = _runs(sweep_run)
    summary = {r["trial"]: r for r in _summary(sweep_run)}
    assert set(children) == set(summary)  # one child run per trial, the failed one included
    assert parent.info.status == "FINISHED"
    best_id = parent.data.tags["ossnet.sweep.best_trial"]
    assert summary[best_id]["rank"] == "1"
    best_by_mlflow = None
    for trial_id, child in children.items():
        status = summary[trial_id]["status"]
        assert child.data.tags["ossnet.tune.status"] == status
        assert child.info.status == {"completed": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}[status]
        if status == "failed":
            assert "injected failure" in child.data.tags["ossnet.tune.error"]
            continue
        settings = json.loads(child.data.tags["ossnet.tune.settings"])
        assert float(child.data.params["train.lr"]) == pytest.approx(settings["lr"])
        assert float(child.data.params["sampling.border_ratio"]) == pytest.approx(settings["border_ratio"])
        epochs = int(summary[trial_id]["epochs"])
        assert child.data.tags["ossnet.tune.epochs"] == str(epochs)
        history = client.get_metric_history(child.info.run_id, "val_dice")
        steps = sorted(m.step for m in history)
        # Each epoch once, the resumed ones included. A stopped trial's workers may finish one
        # more epoch before they are shut down: the run keeps it, the sweep does not count it.
        assert steps[:epochs] == list(range(1, epochs + 1)) and len(set(steps)) == len(steps)
        assert status == "early_stopped" or len(steps) == epochs
        best = max(m.value for m in history if m.step <= epochs)
        assert best == pytest.approx(float(summary[trial_id]["val_dice"]), abs=5e-5)  # the table rounds to 4 digits
        if best_by_mlflow is None or best > best_by_mlflow[1]:
            best_by_mlflow = (trial_id, best)
    assert best_by_mlflow is not None and best_by_mlflow[0] == best_id
    assert parent.data.metrics["best_val_dice"] == pytest.approx(best_by_mlflow[1])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {"sweep/summary.csv", "sweep/summary.md"}
    patch = summary[best_id]["patch_size"]
    assert children[best_id].data.params["model.variant"] == ("D" if "+" in patch else "C")
    assert f"best trial {best_id}: val_dice {best_by_mlflow[1]:.4f}" in sweep_run.stdout
    assert "| rank | trial    | status" in sweep_run.stdout


def test_champion_alias_points_to_the_best_trials_model(sweep_run: SweepRun) -> None:
    client = _client(sweep_run)
    parent, children = _runs(sweep_run)
    best_id = parent.data.tags["ossnet.sweep.best_trial"]
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == children[best_id].info.run_id
    assert champion.tags["ossnet.tune.trial_id"] == best_id
    assert math.isclose(float(champion.tags["val_dice"]), parent.data.metrics["best_val_dice"], rel_tol=1e-9)
    assert parent.data.tags["ossnet.sweep.model_version"] == str(champion.version)
    # Only the sweep registered a model: trials do not, and the resume did not add another.
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")] == [str(champion.version)]
    # Selected on validation, promoted on the test case no trial saw: both scores are kept.
    test_dice = float(champion.tags["test_dice"])
    assert parent.data.metrics["test_dice"] == pytest.approx(test_dice)
    assert champion.tags["ossnet.test_cases"] == "1"
    assert "highest test Dice on the 1 test cases" in champion.tags["ossnet.promotion"]
    assert f"best trial's test Dice {test_dice:.4f} on the store's test split" in sweep_run.stdout
    assert f"model {MODEL_NAME} v{champion.version} ({test_dice:.4f}) is now 'champion'" in sweep_run.stdout


# --------------------------------------------------------------------------- no cluster needed


class _FakeTrial:
    def __init__(self, trial_id: str, folder: Path) -> None:
        import pyarrow.fs

        self.trial_id = trial_id
        self.path = str(folder)
        self.storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem()})()


def test_resumable_asha_rebuilds_its_rungs_from_saved_results(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from ossnet_tune.scheduler import ResumableASHA

    done = tmp_path / "done"
    done.mkdir()
    lines = [json.dumps({"epoch": e, "val_dice": v}) for e, v in ((1, 0.5), (2, 0.6), (3, 0.7))]
    (done / "result.json").write_text("\n".join(lines) + "\n{\"epoch\": 4, \"val_")  # cut short by a kill
    kwargs = dict(time_attr="epoch", metric="val_dice", mode="max", max_t=3, grace_period=1, reduction_factor=2,
                  stop_last_trials=False)
    decisions = {}
    for cls in (ASHAScheduler, ResumableASHA):
        scheduler = cls(**kwargs)
        scheduler.on_trial_add(None, _FakeTrial("done", done))  # restored: finished before the interruption
        scheduler.on_trial_add(None, _FakeTrial("new", tmp_path / "new"))  # no saved results
        decisions[cls] = scheduler.on_trial_result(None, _FakeTrial("new", tmp_path / "new"), {"epoch": 1, "val_dice": 0.1})
    assert decisions[ResumableASHA] == TrialScheduler.STOP  # compared with the restored trial's epoch 1
    assert decisions[ASHAScheduler] == TrialScheduler.CONTINUE  # Tune's own: empty rungs after a restore
