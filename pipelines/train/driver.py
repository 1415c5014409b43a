"""``train(job)``: the Ray Train driver (TorchTrainer, Train V2) with MLflow tracking.

Steps, all on the driver process:

1. resolve the job (absolute paths, fixed run name) and check it against the store and the
   tracking URI before any worker starts;
2. start or join Ray (:func:`ensure_ray`), build the streaming training dataset with its
   :class:`~ossnet_pipelines.data.EpochClock`;
3. open the MLflow run (resumed by the run name) and log the config as params and artifacts;
4. ``TorchTrainer.fit()`` runs :func:`~ossnet_pipelines.train.loop.train_loop_per_worker`; Ray keeps
   the best ``keep_checkpoints`` checkpoints by ``val_dice`` plus the latest under
   ``<storage_path>/<run name>``, and restarts the workers up to ``max_failures`` times;
5. log the best checkpoint as the pyfunc model bundle, register it and move ``champion`` to it
   if its validation Dice beats the current champion's. Re-running a finished job does not log
   or register the same model again (the run's ``ossnet.model_epoch`` tag records it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ossnet.checkpoint import PreprocessSpec
from ossnet.config import ConfigError
from ossnet_pipelines import raystart
from ossnet_pipelines.jobconfig import dump_yaml
from ossnet_pipelines.jobrunner import JobIncomplete
from ossnet_pipelines.tracking.tags import (
    BEST_VAL_DICE_TAG,
    MODEL_EPOCH_TAG,
    MODEL_URI_TAG,
    MODEL_VERSION_TAG,
    PROMOTED_TAG,
    PROMOTION_TAG,
)
from ossnet_pipelines.train.job import StoreFacts, TrainJob, check_against_store
from ossnet_pipelines.train.loop import EpochHook, train_loop_per_worker
from ossnet_pipelines.train.state import (
    MODEL_FILE,
    SCORE_METRIC,
    LocalCheckpoints,
    checkpoint_directory,
    read_history,
    read_metrics,
)

if TYPE_CHECKING:
    from ossnet_pipelines.tracking import RunLogger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training job produced.

    Attributes:
        run_name: Ray Train run name = MLflow run key.
        run_dir: ``<storage_path>/<run_name>`` (Ray's checkpoints, ossnet's markers).
        epochs: the last completed epoch (``job.train.epochs`` on success).
        executed_epochs: epochs the final attempt ran (a resumed run skips finished ones).
        metrics: the last reported metrics.
        history: per-epoch metrics of the final attempt.
        best_epoch, best_val_dice: the best checkpoint by validation Dice.
        best_checkpoint: directory of that checkpoint (``model.pt`` inside).
        mlflow_run_id: the MLflow run (None with tracking off).
        model_uri: ``models:/<model_id>`` of the logged bundle.
        model_version: registered version (None when registration is off).
        promoted: whether ``champion`` moved to this version in this call.
        test_dice: the model's mean Dice on the store's test split (the promotion evidence).
        promotion: the promotion rule and what it decided, one line.
    """

    run_name: str
    run_dir: str
    epochs: int
    executed_epochs: tuple[int, ...]
    metrics: dict[str, float]
    history: tuple[dict[str, float], ...] = ()
    best_epoch: int | None = None
    best_val_dice: float | None = None
    best_checkpoint: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    model_version: int | None = None
    promoted: bool = False
    test_dice: float | None = None
    promotion: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def ensure_ray(job: TrainJob) -> None:
    """Join or start Ray (``ossnet_pipelines.raystart``) with enough logical CPUs for the workers plus
    the data tasks, the job's object store and the dashboard (Train V2's placement-group cleaner
    polls its State API)."""
    workers = job.scaling.num_workers * job.scaling.worker_resources()["CPU"]
    raystart.ensure_ray(min_cpus=workers + job.data.cpus_per_task, object_store_mb=job.data.object_store_mb + 256)


def _tracking_uri(job: TrainJob) -> str | None:
    if not job.tracking.enabled:
        return None
    from ossnet_pipelines.tracking import TrackingConfigError, resolve_tracking_uri
    from ossnet_pipelines.tracking.uri import check_reachable

    try:
        uri = resolve_tracking_uri(job.tracking.uri)
        check_reachable(uri)
    except TrackingConfigError as exc:
        message = str(exc).removeprefix("--tracking-uri: ")  # the resolver names its own flag
        raise ConfigError(f"tracking.uri: {message}") from None
    return uri


def preflight(job: TrainJob) -> tuple[TrainJob, StoreFacts, str | None]:
    """Resolve and check a job without starting anything: ``(resolved job, store facts, URI)``."""
    job = job.resolved()
    facts = check_against_store(job)
    return job, facts, _tracking_uri(job)


def _best_checkpoint(result: Any, local: LocalCheckpoints | None) -> tuple[Any, dict[str, Any]] | None:
    """The best checkpoint by ``val_dice`` (latest on ties) and its metrics: a local directory
    in local mode, else a ``ray.train.Checkpoint`` (possibly on remote storage)."""
    if local is not None:
        best = local.best()
        return (best[0], best[1]) if best else None
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        return None

    def key(item: tuple[Any, dict[str, Any]]) -> tuple[float, float]:
        value = item[1].get(SCORE_METRIC)
        score = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf
        return score, float(item[1].get("epoch", 0))

    checkpoint, metrics = max(candidates, key=key)
    return checkpoint, dict(metrics)


def _recover_cwd(path: str) -> None:
    """Re-enter ``path`` when the working directory was deleted under this process.

    A Ray job's driver runs in its unpacked ``working_dir``; when several nodes share one host
    and temp dir (infra/local-cluster.sh), another node's runtime-env agent may unpack the same
    package again, replacing the directory. The path is valid again, but this process's working
    directory is the deleted one (and MLflow calls ``os.getcwd()``).
    """
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    import tempfile

    target = path if os.path.isdir(path) else tempfile.gettempdir()
    logger.warning("the working directory %s was removed under this process; continuing in %s", path, target)
    os.chdir(target)


def _location(checkpoint: Any) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else str(checkpoint.path)


def _open_run(job: TrainJob, uri: str | None, parent_run_id: str | None) -> contextlib.AbstractContextManager[Any]:
    if uri is None:
        return contextlib.nullcontext(None)
    from ossnet_pipelines.tracking import RunLogger

    # System metrics come from the process that trains: here in local mode, else rank 0's worker.
    return RunLogger(job.run_name, job.tracking.experiment, uri, parent_run_id=parent_run_id,
                     tags={"ossnet.variant": job.model.variant, "ossnet.preset": job.model.preset,
                           "ossnet.store": job.store},
                     log_system_metrics=job.tracking.system_metrics and job.scaling.num_workers == 0)


def _log_config(run: RunLogger, job: TrainJob, config_path: str | os.PathLike[str] | None, tmp: Path) -> None:
    run.log_params(job.to_dict())
    resolved = tmp / "train.resolved.yaml"
    resolved.write_text(dump_yaml(job))
    run.log_artifact(resolved, "config")
    if config_path is not None and Path(config_path).is_file():
        run.log_artifact(config_path, "config")
    from ossnet_pipelines.tracking.lineage import log_store_input

    dataset = log_store_input(run, job.store)
    logger.info("MLflow run %s: dataset input %s (digest %s)", run.run_id, dataset.name, dataset.digest)


def _log_and_register(run: RunLogger, job: TrainJob, facts: StoreFacts,
                      best: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Log the best checkpoint as the model bundle and register it (once per best epoch), with
    its test-split Dice deciding ``champion`` (``ossnet_pipelines.train.promotion``)."""
    from ossnet_pipelines.train.promotion import TestSet, register_on_test_evidence

    checkpoint, metrics = best
    epoch = int(metrics.get("epoch", 0))
    val_dice = float(metrics.get(SCORE_METRIC, float("nan")))
    tags = run.client.get_run(run.run_id).data.tags
    if tags.get(MODEL_EPOCH_TAG) == str(epoch) and (tags.get(MODEL_VERSION_TAG) or not job.tracking.register):
        logger.info("run %s already logged its best model (epoch %d); not logging it again", run.run_id, epoch)
        version = tags.get(MODEL_VERSION_TAG)
        return {"model_uri": tags.get(MODEL_URI_TAG), "model_version": int(version) if version else None,
                "promoted": False, "promotion": tags.get(PROMOTION_TAG, "")}
    with checkpoint_directory(checkpoint) as directory:
        info = run.log_model_bundle(directory / MODEL_FILE, name="model", step=epoch,
                                    metadata={SCORE_METRIC: val_dice, "epoch": epoch, "run_name": job.run_name})
    run.link_metrics_to_model(info.model_id, "val_", step=epoch)
    out: dict[str, Any] = {"model_uri": info.model_uri, "model_version": None, "promoted": False}
    new_tags = {MODEL_EPOCH_TAG: epoch, MODEL_URI_TAG: info.model_uri, BEST_VAL_DICE_TAG: val_dice}
    if job.tracking.register:
        test_set = TestSet.of(job.store, facts.test_cases) if facts.test_cases else None
        evidence = register_on_test_evidence(
            info.model_uri, model_name=job.tracking.model_name, val_dice=val_dice, test_set=test_set,
            tracking_uri=run.tracking_uri, mode=job.validation.mode, chunk_points=job.validation.chunk_points,
            objective=job.validation.objective, tags={"ossnet.run_name": job.run_name, "epoch": epoch})
        if evidence.test is not None:
            run.log_metrics({"test_dice": evidence.test.dice, "test_iou": evidence.test.iou,
                             "test_cases": float(len(evidence.test.per_case))}, step=epoch)
            run.link_metrics_to_model(info.model_id, "test_", step=epoch)
            out["test_dice"] = evidence.test.dice
        out.update(model_version=evidence.version, promoted=evidence.promoted, promotion=evidence.message)
        new_tags.update({MODEL_VERSION_TAG: evidence.version, PROMOTED_TAG: evidence.promoted,
                         PROMOTION_TAG: evidence.message})
    run.set_tags(new_tags)
    return out


class TrackingUnavailableError(JobIncomplete):
    """Training finished but the tracking server could not take the model (one line, names the URI)."""


def _finish_tracking(run: RunLogger, job: TrainJob, facts: StoreFacts, best: tuple[Any, dict[str, Any]] | None,
                     latest: Any) -> dict[str, Any]:
    """Send the metrics an outage kept back (from the latest checkpoint's history), then log and
    register the best model. An unreachable server ends in one line saying to run the job again."""
    from ossnet_pipelines.tracking.outage import is_outage, reconcile_metrics

    try:
        if latest is not None:
            with checkpoint_directory(latest) as directory:
                reconcile_metrics(run, read_history(directory))
        return _log_and_register(run, job, facts, best) if best is not None else {}
    except Exception as exc:
        if not is_outage(exc):
            raise
        raise TrackingUnavailableError(
            f"training finished (checkpoints in {Path(job.run.storage_path) / job.run_name}) but MLflow at "
            f"{run.tracking_uri} is unreachable: the model is not logged or registered yet; run the same command "
            "again when the server is back (it trains nothing and sends everything once)"
        ) from exc


def train(
    job: TrainJob,
    *,
    config_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Any] = (),
    parent_run_id: str | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
) -> TrainResult:
    """Train OSS-Net with Ray Train and track it in MLflow.

    Args:
        job: the job (validated; local paths may be relative to the current directory).
        config_path: the YAML the job came from, logged as an artifact next to the resolved one.
        callbacks: extra ``ray.train.UserCallback`` objects (e.g. Tune's ``TuneReportCallback``);
            in local mode (no workers) the loop calls their ``after_report`` itself.
        parent_run_id: MLflow parent run (a sweep).
        epoch_hooks: callables run on every worker with an ``EpochEnd`` after each epoch is
            logged and before it is checkpointed (``ossnet_pipelines.train.loop``); pickled to the workers.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: the job does not fit the store or the tracking settings (nothing started).
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    from ossnet_pipelines.data import EpochClock, build_training_dataset, ingest_options

    cwd = os.getcwd()
    job, facts, uri = preflight(job)
    ensure_ray(job)
    run_dir = Path(job.run.storage_path) / job.run_name
    local_mode = job.scaling.num_workers == 0
    options = ingest_options(object_store_memory=job.data.object_store_mb << 20)
    clock = EpochClock.create(epoch=0, world_size=job.scaling.world_size)
    dataset = build_training_dataset(
        job.store, "train", facts.model, job.sampling, job.augment, epoch=clock, seed=job.train.seed,
        samples_per_case=job.train.samples_per_case, num_cpus=job.data.cpus_per_task,
        max_tasks=job.data.max_tasks, options=options,
    )
    # Ray Data's bars in a terminal (they redraw in place); none in a log, where every epoch's
    # bars would be a screenful of lines.
    dataset.context.enable_progress_bars = sys.stderr.isatty()
    if not raystart.verbose():
        # Its advice ("set memory=...") is about the sampling tasks ossnet sizes itself; it
        # fired after every epoch of the quickstart. `ossnet -v` keeps it.
        detectors = dataset.context.issue_detectors_config.detectors
        dataset.context.issue_detectors_config.detectors = [d for d in detectors if "HighMemory" not in d.__name__]
    preprocess = PreprocessSpec(modalities=facts.modalities, volume_shape=tuple(facts.model.volume_shape),
                                zscore_mask=facts.zscore_mask, resample=facts.resample,
                                target_spacing=facts.target_spacing)
    loop_config = {
        "job": job, "facts": facts, "clock": clock, "tracking_uri": uri, "parent_run_id": parent_run_id,
        "local_mode": local_mode, "run_dir": str(run_dir), "preprocess": preprocess,
        "epoch_hooks": tuple(epoch_hooks),
        "quiet": not raystart.verbose(),
        "local_callbacks": list(callbacks) if local_mode else [],
        "local_dataset": dataset if local_mode else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
            resources_per_worker=job.scaling.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=job.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.train.keep_checkpoints, checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures),
            callbacks=list(callbacks) or None,
            # Ray Train's own INFO lines (resources requested, worker group started, a report per
            # epoch) go to its log files only; ossnet's epoch lines and warnings still show.
            logging_config=None if raystart.verbose() else ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options={"train": options}),
    )
    logger.info("training %s: %d epochs, %d worker(s)%s, checkpoints in %s", job.run_name, job.train.epochs,
                job.scaling.num_workers, " (GPU)" if job.scaling.use_gpu else "", run_dir)
    with _open_run(job, uri, parent_run_id) as run, tempfile.TemporaryDirectory(prefix="ossnet-train-") as tmp:
        if run is not None:
            _log_config(run, job, config_path, Path(tmp))
        result = trainer.fit()
        _recover_cwd(cwd)
        returned = result.return_value or {}
        local = LocalCheckpoints(run_dir / "local", job.train.keep_checkpoints) if local_mode else None
        best = _best_checkpoint(result, local)
        registered: dict[str, Any] = {}
        if run is not None:
            registered = _finish_tracking(run, job, facts, best, local.latest() if local else result.checkpoint)
    history = tuple(returned.get("history") or ())
    executed = tuple(returned.get("executed_epochs") or ())
    if history:
        metrics = dict(history[-1])
    else:  # nothing left to train: the metrics of the latest checkpoint
        latest = local.latest() if local is not None else None
        raw = read_metrics(latest) if latest is not None else (result.metrics or {})
        metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
    out = TrainResult(
        run_name=job.run_name,
        run_dir=str(run_dir),
        epochs=int(returned.get("start_epoch", 1)) - 1 + len(executed),
        executed_epochs=executed,
        metrics=metrics,
        history=history,
        best_epoch=int(best[1]["epoch"]) if best and "epoch" in best[1] else None,
        best_val_dice=float(best[1][SCORE_METRIC]) if best and SCORE_METRIC in best[1] else None,
        best_checkpoint=_location(best[0]) if best else None,
        mlflow_run_id=run.run_id if run is not None else None,
        model_uri=registered.get("model_uri"),
        model_version=registered.get("model_version"),
        promoted=bool(registered.get("promoted", False)),
        test_dice=registered.get("test_dice"),
        promotion=registered.get("promotion", ""),
        extra={"world_size": returned.get("world_size"), "start_epoch": returned.get("start_epoch")},
    )
    logger.info("finished %s at epoch %d (best val_dice %s at epoch %s)", out.run_name, out.epochs,
                f"{out.best_val_dice:.4f}" if out.best_val_dice is not None else "n/a", out.best_epoch)
    return out


__all__ = ["TrackingUnavailableError", "TrainResult", "ensure_ray", "preflight", "train"]
