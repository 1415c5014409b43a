"""``run_sweep(job)``: Ray Tune + Optuna (seeded TPE) + ASHA over Ray Train runs, in MLflow.

Steps, all on the sweep driver:

1. resolve the job (absolute paths, fixed sweep name), check the store and the tracking URI;
   a fresh sweep refuses to overwrite an existing one, ``resume`` requires one;
2. join or start Ray, derive ``max_concurrent_trials`` from what one trial needs (its Train
   driver, the Train workers, one data task) and what the cluster has;
3. open the MLflow parent run and run ``Tuner(run_trial)`` (or ``Tuner.restore`` it): each
   trial is a Train driver whose epochs reach ASHA through ``TuneReportCallback``;
4. read every trial back from the experiment state, tag and close the MLflow child runs,
   write the summary table (CSV + Markdown) next to the Tune state and into the parent run;
5. register the best trial's model (chosen on validation Dice); ``champion`` moves only if its
   Dice on the store's test split, which no trial saw, beats the current holder's.

A failed trial (bad settings, a crash) is recorded and the others go on (``fail_fast`` off,
``sweep.max_failures`` retries). A sweep whose driver died continues with ``resume=True``:
finished trials keep their results, interrupted ones resume their Train runs from the last
checkpoint, and the search continues from the restored Optuna study.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ossnet.config import ConfigError
from ossnet_pipelines.jobconfig import dump_yaml
from ossnet_pipelines.train.job import TrainJob, check_against_store
from ossnet_pipelines.train.state import SCORE_METRIC
from ossnet_pipelines.tracking.tags import BEST_RUN_TAG, BEST_TRIAL_TAG
from ossnet_tune.job import TuneJob
from ossnet_tune.space import OptunaSpace
from ossnet_tune.summary import TrialSummary, best_trial, rank_trials, status_counts, summarize_trial, to_csv, to_markdown
from ossnet_tune.trial import TRIAL_RUNS_DIR, TrialHook, run_trial, trial_run_name

if TYPE_CHECKING:
    from ossnet_pipelines.tracking import RunLogger

logger = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


@dataclass(frozen=True)
class SweepResult:
    """What a sweep produced.

    Attributes:
        name: the sweep name (Tune experiment name = MLflow parent run key).
        experiment_path: Tune's experiment folder (``--resume`` restores it).
        trials: every trial, best first (see :mod:`ossnet_tune.summary`).
        best: the best completed or early-stopped trial (None if none scored).
        max_concurrent_trials: trials run at once.
        parent_run_id: the MLflow parent run (None with tracking off).
        model_uri, model_version, promoted: the best trial's logged model, its registered
            version and whether ``champion`` moved to it.
        test_dice: the best trial's model's Dice on the store's test split (the promotion evidence).
        promotion: the promotion rule and what it decided, one line.
        summary_csv: the summary table's CSV file; ``summary_markdown``: the table as text.
    """

    name: str
    experiment_path: str
    trials: tuple[TrialSummary, ...]
    best: TrialSummary | None
    max_concurrent_trials: int
    parent_run_id: str | None = None
    model_uri: str | None = None
    model_version: int | None = None
    promoted: bool = False
    test_dice: float | None = None
    promotion: str = ""
    summary_csv: str | None = None
    summary_markdown: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Trials per status."""
        return status_counts(self.trials)


def trial_actor_resources(base: TrainJob, trial_cpus: float) -> dict[str, float]:
    """Resources of the Tune actor that runs a trial's Train driver.

    With ``scaling.num_workers: 0`` (Ray Train local mode) the driver trains in the actor
    itself, so the actor holds one worker's resources; otherwise only ``trial_cpus``.
    """
    return base.scaling.worker_resources() if base.scaling.num_workers == 0 else {"CPU": trial_cpus}


def trial_resources(base: TrainJob, trial_cpus: float) -> dict[str, float]:
    """Logical resources one trial holds: its Train driver, the Train workers and one data task."""
    need: dict[str, float] = dict(trial_actor_resources(base, trial_cpus))
    need["CPU"] = need.get("CPU", 0.0) + base.data.cpus_per_task
    for key, value in base.scaling.worker_resources().items():
        need[key] = need.get(key, 0.0) + value * base.scaling.num_workers
    return need


def derive_max_concurrent(per_trial: Mapping[str, float], cluster: Mapping[str, float], num_samples: int) -> int:
    """How many trials fit the cluster at once (at least 1, at most ``num_samples``).

    Tune only schedules the trial actors; the Train workers of a trial start later in their
    own placement group. Without this cap Tune would start every trial whose actor fits and
    their Train runs would wait for each other's workers.

    Raises:
        ConfigError: one trial needs more of a resource than the whole cluster has.
    """
    limits = [num_samples]
    for key, need in per_trial.items():
        if need <= 0:
            continue
        have = float(cluster.get(key, 0.0))
        if have + 1e-9 < need:
            raise ConfigError(f"sweep: one trial needs {need:g} {key} (driver, workers and a data task) but the "
                              f"cluster has {have:g}; lower scaling.num_workers or the resources, or set "
                              "sweep.max_concurrent_trials to wait for an autoscaler")
        limits.append(int(math.floor(have / need + 1e-9)))
    return max(1, min(limits))


def prepare(job: TuneJob) -> tuple[TuneJob, str | None]:
    """Resolve and check a sweep without starting anything: ``(resolved job, tracking URI)``.

    Raises:
        ConfigError: the store is missing or does not fit the model, or the tracking URI is bad.
    """
    job = job.resolved()
    check_against_store(job.base)
    uri = None
    if job.base.tracking.enabled:
        from ossnet_pipelines.tracking import TrackingConfigError, resolve_tracking_uri
        from ossnet_pipelines.tracking.uri import check_reachable

        try:
            uri = resolve_tracking_uri(job.base.tracking.uri)
            check_reachable(uri)
        except TrackingConfigError as exc:
            raise ConfigError(f"tracking.uri: {exc}") from None
        # Trials run in Tune's per-trial folders: they must get the URI, not re-resolve it.
        job = job.updated({"tracking.uri": uri})
    return job, uri


def _check_state(job: TuneJob, resume: bool) -> None:
    from ray.tune import Tuner

    exists = Tuner.can_restore(job.experiment_path)
    if resume and not exists:
        raise ConfigError(f"sweep.name: no sweep {job.name!r} to resume at {job.experiment_path} "
                          "(start it without --resume, or pass the same config and sweep.name as before)")
    if not resume and exists:
        raise ConfigError(f"sweep.name: sweep {job.name!r} already exists at {job.experiment_path}; "
                          "pass --resume to continue it, or set another sweep.name")


def _trainable(job: TuneJob, parent_run_id: str | None, trial_hook: TrialHook | None) -> Any:
    import ray.tune

    fn = ray.tune.with_parameters(
        run_trial, base=job.base, sweep_name=job.name, parent_run_id=parent_run_id,
        storage_path=os.path.join(job.experiment_path, TRIAL_RUNS_DIR), trial_hook=trial_hook,
    )
    return ray.tune.with_resources(fn, trial_actor_resources(job.base, job.sweep.trial_cpus))


def _new_tuner(job: TuneJob, trainable: Any, max_concurrent: int, verbose: int) -> Any:
    import optuna
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    from ossnet_tune.progress import SweepProgress
    from ossnet_tune.scheduler import ResumableASHA

    points = [job.space.normalized_point(p) for p in job.sweep.points_to_evaluate]
    searcher = OptunaSearch(
        OptunaSpace(job.space), metric=SCORE_METRIC, mode="max", points_to_evaluate=points or None,
        sampler=optuna.samplers.TPESampler(seed=job.sweep.seed, n_startup_trials=job.sweep.startup_trials),
    )
    # stop_last_trials=False: a trial that reaches max_t ends by itself. With ASHA's default,
    # Tune would kill it at its last report, before the Train driver shuts its workers down
    # (leaking their placement group) and logs the best checkpoint and closes its MLflow run.
    scheduler = ResumableASHA(
        time_attr="epoch", metric=SCORE_METRIC, mode="max", max_t=job.max_t,
        grace_period=job.scheduler.grace_period, reduction_factor=job.scheduler.reduction_factor,
        brackets=job.scheduler.brackets, stop_last_trials=False,
    )
    progress = SweepProgress(job.sweep.num_samples, SCORE_METRIC)
    if verbose == 1 and sys.stderr.isatty():
        verbose = 0  # in a terminal the progress bar stands in for Tune's status tables
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=job.sweep.num_samples,
                                        max_concurrent_trials=max_concurrent),
        run_config=ray.tune.RunConfig(
            name=job.name, storage_path=job.sweep.storage_path, verbose=verbose, callbacks=[progress],
            failure_config=ray.tune.FailureConfig(max_failures=job.sweep.max_failures, fail_fast=False),
        ),
    )


def collect_trials(job: TuneJob, experiment_path: str) -> tuple[TrialSummary, ...]:
    """Every trial of the experiment, summarised from Tune's saved state and results."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    out = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = frame.to_dict("records") if frame is not None and len(frame) else []
        error = None
        if trial.status == "ERROR":
            err = trial.get_error()
            error = str(err) if err is not None else "failed (no error text saved)"
        out.append(summarize_trial(trial.trial_id, trial_run_name(job.name, trial.trial_id), trial.status,
                                   dict(trial.config or {}), rows, error, job.max_t))
    return rank_trials(out)


def _write_summary(job: TuneJob, trials: tuple[TrialSummary, ...]) -> Path:
    """Write ``summary.csv`` and ``summary.md`` next to Tune's state; returns the CSV path."""
    searched = job.space.searched()
    folder = Path(job.experiment_path)
    csv_path = folder / SUMMARY_CSV
    csv_path.write_text(to_csv(trials, searched))
    (folder / SUMMARY_MD).write_text(to_markdown(trials, searched))
    return csv_path


def _log_parent(run: RunLogger, job: TuneJob, trials: tuple[TrialSummary, ...], folder: Path,
                config_path: str | os.PathLike[str] | None) -> None:
    counts = status_counts(trials)
    best = best_trial(trials)
    metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
    if best is not None:
        metrics["best_val_dice"] = float(best.best_val_dice or 0.0)
        run.set_tags({BEST_TRIAL_TAG: best.trial_id, BEST_RUN_TAG: best.run_name})
        run.log_params({f"best.{k}": v for k, v in best.settings.items()})
    run.log_metrics(metrics, step=0)
    for name in (SUMMARY_CSV, SUMMARY_MD):
        run.log_artifact(folder / name, "sweep")
    if config_path is not None and Path(config_path).is_file():
        run.log_artifact(config_path, "config")
    from ossnet_pipelines.tracking.lineage import log_store_input

    log_store_input(run, job.base.store)


def run_sweep(
    job: TuneJob,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    config_path: str | os.PathLike[str] | None = None,
    verbose: int = 1,
    trial_hook: TrialHook | None = None,
) -> SweepResult:
    """Run (or resume) a hyperparameter sweep.

    Args:
        job: the validated sweep.
        resume: continue the sweep of the same name (``Tuner.restore``); finished trials are
            kept, unfinished ones continue.
        retry_failed: with ``resume``, run failed trials again (from their last checkpoint).
        config_path: the YAML the job came from, logged to the parent run.
        verbose: Tune's console verbosity (0 silent, 1 status tables, 2 every result); 1 in a
            terminal becomes 0: a progress bar (trials done, failed, best score) stands in.
        trial_hook: called in each trial's actor before it trains (``ossnet_tune.trial.TrialHook``).

    Returns:
        A :class:`SweepResult` (trials best first).

    Raises:
        ConfigError: bad store or tracking settings, or a sweep state conflict (nothing started).
    """
    import ray
    from ray.tune import Tuner

    from ossnet_pipelines.train.driver import ensure_ray

    job, uri = prepare(job)
    _check_state(job, resume)
    ensure_ray(job.base)
    per_trial = trial_resources(job.base, job.sweep.trial_cpus)
    max_concurrent = job.sweep.max_concurrent_trials or derive_max_concurrent(
        per_trial, ray.cluster_resources(), job.sweep.num_samples)
    logger.info("sweep %s: %d trials, %d at a time (each %s), state in %s", job.name, job.sweep.num_samples,
                max_concurrent, ", ".join(f"{v:g} {k}" for k, v in per_trial.items()), job.experiment_path)

    parent_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
    if uri is not None:
        from ossnet_tune.tracking import parent_run

        parent_cm = parent_run(job.name, job.base.tracking.experiment, uri)
    with parent_cm as parent:
        parent_id = parent.run_id if parent is not None else None
        if parent is not None:
            # The parent run exists before any trial: its creation also sets up the tracking
            # database, which concurrent trials would otherwise race to migrate.
            parent.log_params({"space": job.space.to_dict(), "sweep": job.sweep.to_dict(),
                               "scheduler": job.scheduler.to_dict()})
            parent.log_dict(job.to_dict(), "config/tune.resolved.yaml")
        trainable = _trainable(job, parent_id, trial_hook)
        if resume:
            logger.info("resuming sweep %s from %s", job.name, job.experiment_path)
            tuner = Tuner.restore(job.experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=retry_failed)
        else:
            tuner = _new_tuner(job, trainable, max_concurrent, verbose)
        grid = tuner.fit()
        trials = collect_trials(job, grid.experiment_path)
        finished = _finish(parent, job, trials, config_path) if parent is not None else None
        if finished is None:
            _write_summary(job, trials)
    trials = finished.trials if finished is not None else trials
    best = best_trial(trials)
    counts = status_counts(trials)
    logger.info("sweep %s: %s; best %s", job.name, ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                f"{best.trial_id} (val_dice {best.best_val_dice:.4f})" if best else "none")
    reg = finished.registration if finished is not None else None
    return SweepResult(
        name=job.name, experiment_path=job.experiment_path, trials=trials, best=best,
        max_concurrent_trials=max_concurrent, parent_run_id=parent_id,
        model_uri=reg.model_uri if reg else None, model_version=reg.model_version if reg else None,
        promoted=bool(reg and reg.promoted), test_dice=reg.test_dice if reg else None,
        promotion=reg.promotion if reg else "", summary_csv=str(Path(job.experiment_path) / SUMMARY_CSV),
        summary_markdown=to_markdown(trials, job.space.searched()),
    )


@dataclass(frozen=True)
class _Finished:
    trials: tuple[TrialSummary, ...]
    registration: Any  # ossnet_tune.tracking.Registration | None


def _finish(parent: RunLogger, job: TuneJob, trials: tuple[TrialSummary, ...],
            config_path: str | os.PathLike[str] | None) -> _Finished:
    """Close the MLflow side of a sweep: child runs, summary artifacts, the best model."""
    from ossnet_tune.tracking import finalize_child_runs, register_best

    trials = rank_trials(finalize_child_runs(parent, trials))
    csv_path = _write_summary(job, trials)
    _log_parent(parent, job, trials, csv_path.parent, config_path)
    best = best_trial(trials)
    if status_counts(trials)["unfinished"]:
        logger.warning("sweep %s stopped with unfinished trials: nothing registered; continue it with --resume",
                       job.name)
        return _Finished(trials, None)
    if best is None:
        return _Finished(trials, None)
    registration = register_best(parent, best, base=job.base)
    return _Finished(trials, registration)


def describe(job: TuneJob) -> str:
    """The resolved sweep as YAML plus comment lines (``--dry-run``)."""
    per_trial = trial_resources(job.base, job.sweep.trial_cpus)
    lines = [f"# sweep: {job.name}", f"# state: {job.experiment_path}",
             f"# each trial holds: {', '.join(f'{v:g} {k}' for k, v in per_trial.items())}",
             f"# ASHA: max_t {job.max_t} epochs, grace {job.scheduler.grace_period}, "
             f"reduction factor {job.scheduler.reduction_factor:g}",
             *(f"# search {line}" for line in job.space.describe())]
    return dump_yaml(job) + "\n".join(lines) + "\n"


__all__ = [
    "SweepResult",
    "TuneJob",
    "collect_trials",
    "derive_max_concurrent",
    "describe",
    "prepare",
    "run_sweep",
    "trial_actor_resources",
    "trial_resources",
]
