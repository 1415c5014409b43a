"""MLflow for sweeps: the parent run, the trials' child runs, the best model's registration.

The sweep driver owns one parent run (key = sweep name, resumed by ``--resume``). Each trial's
training driver opens its own child run (key = the trial's run name, ``mlflow.parentRunId`` =
the parent) and logs its params and per-epoch metrics there. Trials stopped by ASHA are killed
mid-run, so their child runs never end themselves: :func:`finalize_child_runs` marks them
KILLED (FAILED for failed trials) and tags every child with its trial id and sweep status.

Trials do not register models. :func:`register_best` registers the best trial's model once
(the parent run records which trial it registered, so a resumed or re-finalised sweep does not
add another version); ``champion`` moves on the model's test-split Dice, never on the
validation Dice the sweep selected on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossnet_pipelines.tracking import RUN_KEY_TAG, RunLogger
from ossnet_pipelines.tracking.tags import (
    MODEL_EPOCH_TAG,
    MODEL_URI_TAG,
    MODEL_VERSION_TAG,
    PARENT_RUN_TAG,
    PROMOTED_TAG,
    PROMOTION_TAG,
    REGISTERED_PROMOTED_TAG,
    REGISTERED_TRIAL_TAG,
    REGISTERED_URI_TAG,
    REGISTERED_VERSION_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    TRIAL_SETTINGS_TAG,
    TRIAL_STATUS_TAG,
)
from ossnet_pipelines.train.state import MODEL_FILE, SCORE_METRIC
from ossnet_tune.summary import TrialSummary

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ossnet_pipelines.train.job import TrainJob

logger = logging.getLogger(__name__)

_END_STATUS = {"early_stopped": "KILLED", "failed": "FAILED"}


@dataclass(frozen=True)
class Registration:
    """What :func:`register_best` did: the model logged for the best trial and its version."""

    model_uri: str | None = None
    model_version: int | None = None
    promoted: bool = False
    promotion: str = ""  # the promotion rule and what it decided
    test_dice: float | None = None


def parent_run(name: str, experiment: str, tracking_uri: str) -> RunLogger:
    """The sweep's parent run (a context manager; resumed when the sweep is resumed)."""
    return RunLogger(name, experiment, tracking_uri, tags={SWEEP_TAG: name, "ossnet.kind": "sweep"})


def child_runs(client: MlflowClient, parent: RunLogger) -> dict[str, Any]:
    """The parent's child runs by run key (the trials' run names); newest first wins."""
    assert parent.experiment_id is not None
    runs = client.search_runs([parent.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return {run.data.tags.get(RUN_KEY_TAG, run.info.run_name): run for run in runs}


def finalize_child_runs(parent: RunLogger, trials: tuple[TrialSummary, ...]) -> tuple[TrialSummary, ...]:
    """Attach child run ids to the trials, tag the children, end the ones a stop left running."""
    from mlflow.entities import RunTag

    client = parent.client
    runs = child_runs(client, parent)
    out = []
    for trial in trials:
        run = runs.get(trial.run_name)
        if run is None and trial.status == "failed":
            run = _failed_run(client, parent, trial)
        if run is None:
            out.append(trial)
            continue
        run_id = run.info.run_id
        tags = {TRIAL_ID_TAG: trial.trial_id, TRIAL_STATUS_TAG: trial.status, SWEEP_TAG: parent.run_key}
        tags[TRIAL_SETTINGS_TAG] = json.dumps(trial.settings, sort_keys=True)
        # Epochs the scheduler saw; a stopped trial's run may hold one more, trained between
        # ASHA's decision and its workers' shutdown, which the sweep does not count.
        tags["ossnet.tune.epochs"] = trial.epochs
        if trial.best_val_dice is not None:
            tags["ossnet.tune.best_val_dice"] = repr(trial.best_val_dice)
        if trial.error:
            tags["ossnet.tune.error"] = trial.error[:5000]
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        end = _END_STATUS.get(trial.status)
        if end is not None and run.info.status == "RUNNING":
            client.set_terminated(run_id, status=end)
        out.append(replace(trial, mlflow_run_id=run_id))
    return tuple(out)


def _failed_run(client: MlflowClient, parent: RunLogger, trial: TrialSummary) -> Any:
    """A child run for a trial that failed before its training opened one (bad settings)."""
    from mlflow.entities import Param

    tags = {RUN_KEY_TAG: trial.run_name, PARENT_RUN_TAG: parent.run_id, "ossnet.tune.error": (trial.error or "")[:5000]}
    run = client.create_run(parent.experiment_id, run_name=trial.run_name, tags=tags)
    params = [Param(f"tune.{k}", str(v)) for k, v in trial.settings.items()]
    if params:
        client.log_batch(run.info.run_id, params=params)
    client.set_terminated(run.info.run_id, status="FAILED")
    return client.get_run(run.info.run_id)


def register_best(
    parent: RunLogger,
    best: TrialSummary,
    *,
    base: TrainJob,
) -> Registration:
    """Log (if needed) and register the best trial's model; ``champion`` moves on test evidence.

    A trial that ran to the end logged its best checkpoint as a model bundle in its child run
    (tag ``ossnet.model_uri``); an early-stopped one did not, so its best checkpoint is logged
    into its child run here. The best trial was chosen on validation Dice; the model is then
    scored on the store's test split, which no trial saw, and that score decides promotion
    (``ossnet_pipelines.train.promotion``). Both scores go on the version, the parent run and
    the trial's run.

    Args:
        parent: the sweep's started parent run.
        best: the best trial (with its MLflow child run id).
        base: the sweep's training job (store, experiment, model name, validation settings;
            ``tracking.register`` False only makes sure the model is logged).
    """
    from ossnet_pipelines.train.promotion import TestSet, register_on_test_evidence

    client = parent.client
    data = client.get_run(parent.run_id).data
    tags = data.tags
    if tags.get(REGISTERED_TRIAL_TAG) == best.trial_id and tags.get(REGISTERED_URI_TAG):
        version = tags.get(REGISTERED_VERSION_TAG)
        logger.info("sweep %s already registered trial %s (version %s)", parent.run_key, best.trial_id, version)
        # A resumed sweep whose first run got as far as registering reports what that run did.
        promoted_before = tags.get(REGISTERED_PROMOTED_TAG) == "True"
        return Registration(tags[REGISTERED_URI_TAG], int(version) if version else None, promoted_before,
                            tags.get(PROMOTION_TAG, ""), data.metrics.get("test_dice"))
    if best.mlflow_run_id is None:
        logger.warning("best trial %s has no MLflow run; nothing to register", best.trial_id)
        return Registration()
    model_uri = _model_of_best_epoch(client, parent, best, base.tracking.experiment)
    if model_uri is None:
        return Registration()
    if not base.tracking.register:
        parent.set_tags({REGISTERED_TRIAL_TAG: best.trial_id, REGISTERED_URI_TAG: model_uri,
                         REGISTERED_VERSION_TAG: "", REGISTERED_PROMOTED_TAG: False})
        return Registration(model_uri)
    test_cases = _test_cases(base.store)
    evidence = register_on_test_evidence(
        model_uri, model_name=base.tracking.model_name, val_dice=float(best.best_val_dice or 0.0),
        test_set=TestSet.of(base.store, test_cases) if test_cases else None, tracking_uri=parent.tracking_uri,
        mode=base.validation.mode, chunk_points=base.validation.chunk_points, objective=base.validation.objective,
        tags={"ossnet.run_name": best.run_name, "epoch": best.best_epoch, SWEEP_TAG: parent.run_key,
              TRIAL_ID_TAG: best.trial_id},
    )
    client.set_tag(best.mlflow_run_id, MODEL_VERSION_TAG, str(evidence.version))
    client.set_tag(best.mlflow_run_id, PROMOTED_TAG, str(evidence.promoted))
    if evidence.test is not None:
        for run_id in (best.mlflow_run_id, parent.run_id):
            client.log_metric(run_id, "test_dice", evidence.test.dice)
            client.log_metric(run_id, "test_iou", evidence.test.iou)
    parent.set_tags({REGISTERED_TRIAL_TAG: best.trial_id, REGISTERED_URI_TAG: model_uri,
                     REGISTERED_VERSION_TAG: "" if evidence.version is None else evidence.version,
                     REGISTERED_PROMOTED_TAG: evidence.promoted, PROMOTION_TAG: evidence.message})
    return Registration(model_uri, evidence.version, evidence.promoted, evidence.message,
                        evidence.test.dice if evidence.test is not None else None)


def _test_cases(store_url: str) -> list[str]:
    """The store's complete labelled test cases (none: an empty list)."""
    from ossnet_pipelines.data import cached_store, split_case_ids

    try:
        return split_case_ids(cached_store(store_url), "test", None)
    except ValueError:
        return []


def _model_of_best_epoch(client: MlflowClient, parent: RunLogger, best: TrialSummary, experiment: str) -> str | None:
    """The ``models:/`` URI of the best epoch's checkpoint, logging it into the child if absent."""
    assert best.mlflow_run_id is not None
    tags = client.get_run(best.mlflow_run_id).data.tags
    if tags.get(MODEL_URI_TAG) and tags.get(MODEL_EPOCH_TAG) == str(best.best_epoch):
        return tags[MODEL_URI_TAG]
    if not best.checkpoint_path or not (Path(best.checkpoint_path) / MODEL_FILE).is_file():
        logger.warning("best trial %s: no checkpoint of epoch %s at %s; nothing to register", best.trial_id,
                       best.best_epoch, best.checkpoint_path)
        return None
    # Resume the child run by its key to attach the bundle to it (it becomes the active run).
    status = client.get_run(best.mlflow_run_id).info.status
    child = RunLogger(best.run_name, experiment, parent.tracking_uri, parent_run_id=parent.run_id)
    child.start()
    try:
        info = child.log_model_bundle(Path(best.checkpoint_path) / MODEL_FILE, name="model", step=best.best_epoch or 0,
                                      metadata={SCORE_METRIC: best.best_val_dice, "epoch": best.best_epoch,
                                                "run_name": best.run_name})
        child.link_metrics_to_model(info.model_id, "val_", step=best.best_epoch or 0)
        child.set_tags({MODEL_EPOCH_TAG: best.best_epoch, MODEL_URI_TAG: info.model_uri,
                        "ossnet.best_val_dice": best.best_val_dice})
    finally:
        child.end(status if status in ("FINISHED", "FAILED", "KILLED") else "KILLED")
    logger.info("logged the best checkpoint of trial %s (epoch %s) as %s", best.trial_id, best.best_epoch,
                info.model_uri)
    return info.model_uri


__all__ = ["Registration", "child_runs", "finalize_child_runs", "parent_run", "register_best"]
