"""One trial of a sweep: a Ray Train driver (Train V2 pattern) run inside a Tune actor.

The trial builds its ``TrainJob`` from the sweep's base job and the sampled settings, then
calls :func:`ossnet_pipelines.train.train` with Tune's ``TuneReportCallback`` in the Train
``RunConfig``: every epoch a Train worker reports reaches Tune (and ASHA) through it. The
Train run is named after the sweep and the trial id, so a trial that Tune restarts (after the
sweep driver was killed, or a retry) resumes the same Train run from its last checkpoint and
the same MLflow child run. Trials never register a model; the sweep registers the best one.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from ossnet_pipelines.train.job import TrainJob
from ossnet_tune.space import trial_overrides

logger = logging.getLogger(__name__)

TRIAL_RUNS_DIR = "trials"

TrialHook = Callable[[Mapping[str, Any], str], None]
"""Called in the trial's actor with ``(sampled settings, trial id)`` before it trains; an
exception fails the trial (the sweep records it and goes on). Pickled to the actors."""


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """Ray Train run name = MLflow run key of a trial: ``<sweep>-<trial id>``."""
    return f"{sweep_name}-{trial_id}"


def trial_job(base: TrainJob, config: Mapping[str, Any], *, run_name: str, storage_path: str) -> TrainJob:
    """The ``TrainJob`` of one trial, validated like any training job.

    Args:
        base: the sweep's resolved base job (absolute store, tracking URI fixed).
        config: the sampled settings (see :func:`ossnet_tune.space.trial_overrides`).
        run_name: the trial's Train run name.
        storage_path: where the trial's Train run keeps its checkpoints (absolute).

    Raises:
        ConfigError: the settings do not make a valid training job (named field).
    """
    changes = dict(trial_overrides(config, base.model.variant))
    changes.update({"run.name": run_name, "run.storage_path": storage_path, "tracking.register": False})
    return base.updated(changes)


def run_trial(
    config: dict[str, Any],
    *,
    base: TrainJob,
    sweep_name: str,
    storage_path: str,
    parent_run_id: str | None,
    trial_hook: TrialHook | None = None,
) -> None:
    """Tune's function trainable: train one sampled configuration, reporting every epoch.

    Args:
        config: the settings Optuna sampled for this trial.
        base: the sweep's resolved base job.
        sweep_name: the sweep's name (prefix of the trial's run name).
        storage_path: the sweep's trial-runs folder (absolute).
        parent_run_id: the sweep's MLflow run; the trial's run becomes its child.
        trial_hook: called with ``(config, trial id)`` before training (see :data:`TrialHook`).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ossnet_pipelines.train.driver import train

    trial_id = ray.tune.get_context().get_trial_id()
    if trial_hook is not None:
        trial_hook(dict(config), trial_id)
    job = trial_job(base, config, run_name=trial_run_name(sweep_name, trial_id), storage_path=storage_path)
    logger.info("trial %s: %s", trial_id, ", ".join(f"{k}={v}" for k, v in sorted(config.items())))
    result = train(job, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)
    logger.info("trial %s finished: best val_dice %s at epoch %s", trial_id, result.best_val_dice, result.best_epoch)


__all__ = ["TRIAL_RUNS_DIR", "TrialHook", "run_trial", "trial_job", "trial_run_name"]
