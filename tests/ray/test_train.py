"""Ray Train V2 training jobs on the shared session cluster: local mode, DDP, crash + restart,
resume by re-running, checkpoints, MLflow run / metrics / artifacts / registry.

Every run uses the "tiny" preset (32x32x24, 3^3 patch kernels) with 256 points per volume on a
store of four phantoms (37x41x29 sources; three train cases, one validation case).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from ossnet.checkpoint import PreprocessSpec
from ossnet.config import ConfigError, model_config
from ossnet.model import build_model
from ossnet.training import make_optimizer, make_scheduler
from ossnet_pipelines.jobconfig import load_job
from ossnet_pipelines.synthetic import write_phantom_store
from ossnet_pipelines.train import TrainJob
from ossnet_pipelines.train.state import LocalCheckpoints, ResumeError, restore_checkpoint, write_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 3 training cases, 1 validation case, and 1 test case (536) that decides promotion.
    return write_phantom_store(tmp_path_factory.mktemp("train-store"), (500, 501, 502, 503, 536), test_fraction=0.2)


def make_job(store_url: str, tmp: Path, name: str, **overrides: Any) -> TrainJob:
    base: dict[str, Any] = {
        "store": store_url, "model.preset": "tiny", "sampling.n_points": 256, "train.epochs": 2,
        "train.batch_size": 2, "train.lr": 1e-3, "validation.chunk_points": 4096, "data.object_store_mb": 64,
        "scaling.num_workers": 1, "scaling.max_failures": 0, "run.storage_path": str(tmp / "ray_results"),
        "run.name": name, "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "tracking.experiment": "ray-tests",
    }
    base.update(overrides)
    return load_job(TrainJob, None, list(base.items()))


def job_val_case(store_url: str) -> str:
    from ossnet_pipelines.store import open_store

    (case,) = open_store(store_url).case_ids("val")
    return case


def _client(job: TrainJob) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=job.tracking.uri, registry_uri=job.tracking.uri)


def _steps(client: Any, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def _artifacts(client: Any, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


# --------------------------------------------------------------------------- no Ray needed


def test_checkpoint_round_trip_restores_optimiser_schedule_and_rng(tmp_path: Path) -> None:
    cfg = model_config("C", "tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(model, "radam_lookahead", 1e-3)
    sched = make_scheduler(opt, (1, 3), 0.5)
    for _ in range(2):  # real optimiser state: moments, Lookahead slow weights, a decayed LR
        model.zero_grad()
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
        sched.step()
    spec = PreprocessSpec(modalities=("flair", "t1", "t1ce", "t2"), volume_shape=cfg.volume_shape)
    write_checkpoint(tmp_path / "c", model, opt, sched, None, epoch=2, seed=7, metrics={"val_dice": 0.5},
                     preprocess=spec, run_name="r")
    expected_rng = torch.get_rng_state()
    torch.manual_seed(123)

    fresh = build_model(cfg)
    opt2 = make_optimizer(fresh, "radam_lookahead", 1e-3)
    sched2 = make_scheduler(opt2, (1, 3), 0.5)
    restored = restore_checkpoint(tmp_path / "c", fresh, opt2, sched2, None)
    assert restored.epoch == 2 and restored.metrics["val_dice"] == 0.5
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == pytest.approx(5e-4)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), buf_a)
    torch.save(opt2.state_dict(), buf_b)
    assert buf_a.getvalue() == buf_b.getvalue()

    other = build_model(model_config("D", "tiny"))
    with pytest.raises(ResumeError, match="another model config"):
        restore_checkpoint(tmp_path / "c", other, make_optimizer(other), make_scheduler(make_optimizer(other)), None)


def test_local_checkpoint_retention_keeps_best_and_latest(tmp_path: Path) -> None:
    cfg = model_config("A", "tiny")
    model = build_model(cfg)
    opt = make_optimizer(model, "adam")
    sched = make_scheduler(opt)
    spec = PreprocessSpec(modalities=("a", "b", "c", "d"), volume_shape=cfg.volume_shape)
    local = LocalCheckpoints(tmp_path, keep=1)
    for epoch, score in ((1, 0.2), (2, 0.9), (3, 0.1), (4, 0.3)):
        write_checkpoint(local.path_for(epoch), model, opt, sched, None, epoch=epoch, seed=0,
                         metrics={"epoch": epoch, "val_dice": score}, preprocess=spec, run_name="r")
        local.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0004"]
    assert local.latest() == local.path_for(4)
    assert local.best() == (local.path_for(2), {"epoch": 2, "val_dice": 0.9})


# --------------------------------------------------------------------------- preflight


def test_job_is_checked_against_the_store_before_anything_starts(store_url: str, tmp_path: Path) -> None:
    from ossnet_pipelines.train.driver import preflight

    job, facts, uri = preflight(make_job(store_url, tmp_path, "pre"))
    assert len(facts.train_cases) == 3 and len(facts.val_cases) == 1
    assert facts.model.encoder.in_channels == 4 and uri == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match=r"^model.preset: small works on a \(64, 64, 48\) grid but the store"):
        preflight(make_job(store_url, tmp_path, "pre", **{"model.preset": "small"}))
    with pytest.raises(ConfigError, match=r"^store: .*no ossnet store here"):
        preflight(make_job(str(tmp_path / "nowhere.zarr"), tmp_path, "pre"))
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: 4 workers but only 3 training rows"):
        preflight(make_job(store_url, tmp_path, "pre", **{"scaling.num_workers": 4, "train.batch_size": 4}))
    with pytest.raises(ConfigError, match=r"^tracking.uri: '.*mlruns' is a file-store path"):
        preflight(make_job(store_url, tmp_path, "pre", **{"tracking.uri": str(tmp_path / "mlruns")}))


def test_cli_dry_run_prints_the_resolved_job(store_url: str, tmp_path: Path) -> None:
    from ossnet_cli import main

    config = tmp_path / "job.yaml"
    config.write_text(f"store: {store_url}\nmodel: {{preset: tiny}}\ntracking: {{enabled: false}}\n")
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", str(config), "--epochs", "3", "--dry-run"]) == 0
    text = out.getvalue()
    assert "epochs: 3" in text and "# run name: tiny-C-" in text and "val cases: 1" in text
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--config", str(config), "--set", "train.epochs=0"]) == 2
    assert "error: train.epochs: must be >= 1, got 0" in err.getvalue()


# --------------------------------------------------------------------------- training runs


def test_local_mode_trains_tracks_registers_and_reruns_idempotently(
    ray_session: Any, store_url: str, tmp_path: Path
) -> None:
    from ossnet_pipelines.tracking import load_checkpoint_from_mlflow
    from ossnet_pipelines.train import train

    job = make_job(store_url, tmp_path, "local", **{"scaling.num_workers": 0, "train.keep_checkpoints": 1})
    result = train(job)
    assert result.epochs == 2 and result.executed_epochs == (1, 2)
    assert 0.0 <= result.best_val_dice <= 1.0 and result.best_epoch in (1, 2)
    assert result.metrics["train_volumes"] == 3 and result.metrics["val_cases"] == 1
    # local mode: ossnet keeps the checkpoints (best + latest, keep=1)
    kept = sorted(p.name for p in (Path(result.run_dir) / "local").iterdir())
    assert kept[-1] == "checkpoint_epoch_0002" and len(kept) == (1 if result.best_epoch == 2 else 2)

    client = _client(job)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ossnet.run_key"] == "local"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.preset"] == "tiny"
    from ossnet_pipelines.store import open_store
    from ossnet_pipelines.tracking.lineage import store_digest

    (dataset_input,) = run.inputs.dataset_inputs  # the store the run trained on
    assert dataset_input.dataset.digest == store_digest(open_store(store_url))
    for metric in ("train_loss", "train_point_acc", "val_dice", "val_iou", "val_lowres_dice", "val_point_acc"):
        assert _steps(client, run.info.run_id, metric) == [1, 2], metric
    artifacts = _artifacts(client, run.info.run_id)
    assert "config/train.resolved.yaml" in artifacts
    val_case = job_val_case(store_url)
    assert {f"validation/epoch_0001/{val_case}.png", f"validation/epoch_0002/{val_case}.png"} <= artifacts

    assert result.model_version == 1 and result.promoted  # the first version becomes champion
    registered = client.get_registered_model("ossnet")
    assert int(registered.aliases["champion"]) == 1
    version = client.get_model_version("ossnet", "1")
    assert float(version.tags["val_dice"]) == pytest.approx(result.best_val_dice)
    # The test case, unseen by training and checkpoint selection, decided promotion.
    assert float(version.tags["test_dice"]) == pytest.approx(result.test_dice)
    assert client.get_run(result.mlflow_run_id).data.metrics["test_dice"] == pytest.approx(result.test_dice)
    assert version.tags["ossnet.test_cases"] == "1" and "is now 'champion'" in result.promotion
    # The scores are the logged model's own metrics too (MLflow 3's model_id), at its epoch; the
    # run's history above kept one point per epoch.
    assert result.model_uri.startswith("models:/m-")
    linked = {m.key: m for m in client.get_logged_model(result.model_uri.removeprefix("models:/")).metrics}
    assert {"val_dice", "val_iou", "val_lowres_dice", "test_dice", "test_iou"} <= set(linked)
    assert linked["val_dice"].value == pytest.approx(result.best_val_dice) and linked["val_dice"].step == result.best_epoch
    assert linked["test_dice"].value == pytest.approx(result.test_dice)
    model, info = load_checkpoint_from_mlflow("models:/ossnet@champion", job.tracking.uri,
                                              dst_dir=tmp_path / "cache")
    assert info.config == model_config("C", "tiny") and info.extra["epoch"] == result.best_epoch

    again = train(job)  # same job again: nothing to train, nothing new to register
    assert again.executed_epochs == () and again.epochs == 2
    assert again.mlflow_run_id == result.mlflow_run_id and again.model_version == 1 and not again.promoted
    assert len(client.search_model_versions("name='ossnet'")) == 1
    assert _steps(client, run.info.run_id, "train_loss") == [1, 2]


def test_worker_crash_restarts_from_checkpoint_and_rerun_resumes(
    ray_session: Any, store_url: str, tmp_path: Path
) -> None:
    from ossnet_pipelines.train import train

    job = make_job(store_url, tmp_path, "crash", **{"scaling.max_failures": 1, "tracking.model_name": "crash"})

    def crash_once_in_epoch_2(end: Any) -> None:  # pickled by value to the workers
        marker = end.run_dir / ".injected-failure"
        if end.epoch == 2 and end.rank == 0 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("crashed once\n")
            raise RuntimeError("injected failure in epoch 2")

    result = train(job, epoch_hooks=[crash_once_in_epoch_2])
    # The first attempt logged epoch 2 to MLflow, then crashed before checkpointing it; the
    # restarted worker group resumed from epoch 1's checkpoint and ran epoch 2 again.
    assert (Path(result.run_dir) / ".injected-failure").is_file()
    assert result.epochs == 2 and result.executed_epochs == (2,) and result.extra["start_epoch"] == 2
    client = _client(job)
    for metric in ("train_loss", "val_dice", "epoch_seconds"):
        assert _steps(client, result.mlflow_run_id, metric) == [1, 2], metric  # no repeated, no lost epoch
    assert sorted(p.name for p in Path(result.run_dir).glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0001", "checkpoint_epoch_0002"]

    # Run again for longer, with the latest checkpoint damaged (truncated): the run resumes from
    # the one before it, runs epoch 2 again and goes on; MLflow still has each epoch once.
    damaged = Path(result.run_dir) / "checkpoint_epoch_0002" / "model.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    longer = train(make_job(store_url, tmp_path, "crash", **{"tracking.model_name": "crash", "train.epochs": 3}))
    assert longer.run_name == result.run_name and longer.epochs == 3
    assert longer.extra["start_epoch"] == 2 and longer.executed_epochs == (2, 3)
    assert longer.mlflow_run_id == result.mlflow_run_id
    for metric in ("train_loss", "val_dice"):
        assert _steps(client, result.mlflow_run_id, metric) == [1, 2, 3], metric
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["ossnet.model_epoch"] == str(longer.best_epoch)
    assert int(tags["ossnet.model_version"]) == longer.model_version


def test_two_workers_train_with_ddp_on_cpu(ray_session: Any, store_url: str, tmp_path: Path) -> None:
    from ossnet_pipelines.train import train

    job = make_job(store_url, tmp_path, "ddp", **{
        "train.epochs": 1, "scaling.num_workers": 2, "scaling.resources_per_worker": {"CPU": 0.5},
        "tracking.enabled": False,
    })
    result = train(job)
    assert result.extra["world_size"] == 2 and result.executed_epochs == (1,)
    # streaming_split(equal=True) gives both ranks the same number of rows (3 rows -> 1 + 1)
    assert result.metrics["train_volumes"] == 2
    assert result.metrics["val_cases"] == 1  # one validation case, gathered from both ranks
    assert result.best_checkpoint is not None and (Path(result.best_checkpoint) / "model.pt").is_file()
    assert result.mlflow_run_id is None and result.model_version is None
