"""``TuneJob``: a training config plus the three sweep sections, parsed and checked up front.

A sweep YAML is a training YAML (``store``, ``model``, ``sampling``, ``train``, ... exactly as
``ossnet train`` reads them: every trial starts from it) with three more sections::

    space       what to search (ossnet_tune.space.SearchSpace)
    sweep       name, trials, seed, concurrency, trial resources, retries, storage
    scheduler   ASHA: grace period, reduction factor, brackets (max_t = train.epochs)

Everything is validated before Ray starts: the training part as ``TrainJob`` does, the space
on its own (unknown names, empty ranges, malformed patch sizes) and against the model every
trial starts from (patch sizes larger than the grid, alpha without a low-res head), and the
settings a sweep depends on (Train workers so Tune sees every epoch, validation every epoch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import Field, model_validator

from ossnet.config import ConfigError
from ossnet_pipelines.files import absolute_url, local_path
from ossnet_pipelines.jobconfig import JobModel, NonBlank, config_hash, load_job, safe_name
from ossnet_pipelines.train.job import TrainJob
from ossnet_tune.space import SearchSpace

DEFAULT_SWEEP_STORAGE = ".ossnet/tune_results"
TUNE_SECTIONS: tuple[str, ...] = ("space", "sweep", "scheduler")
# Settings that do not change what a sweep explores: left out of the default sweep name, so
# more samples, other concurrency or another tracking server continue the same sweep.
_NAME_EXCLUDES = (
    "base.train.validate_every", "base.train.checkpoint_every", "base.train.keep_checkpoints",
    "base.validation.png_cases", "base.data", "base.scaling", "base.run", "base.tracking",
    "sweep.name", "sweep.num_samples", "sweep.max_concurrent_trials", "sweep.trial_cpus",
    "sweep.max_failures", "sweep.storage_path",
)


class SweepSection(JobModel):
    """How many trials, how they are drawn and where the sweep keeps its state."""

    name: Optional[safe_name(100)] = Field(  # type: ignore[valid-type]
        None, description="stable sweep name (default from the config): --resume finds it")
    num_samples: int = Field(16, ge=1, description="trials in all")
    seed: int = Field(0, ge=0, description="seed of the TPE sampler")
    startup_trials: int = Field(5, ge=1, description="random trials before TPE models the results")
    max_concurrent_trials: Optional[int] = Field(None, ge=1,
                                                 description="default: as many as the cluster's resources fit")
    trial_cpus: float = Field(0.5, gt=0.0, description="logical CPUs of each trial's Train driver (the Tune actor)")
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial (0: record the failure, go on)")
    storage_path: NonBlank = Field(DEFAULT_SWEEP_STORAGE, description="Tune experiment state and the trials' Train runs")
    points_to_evaluate: tuple[dict[str, Any], ...] = Field((), description="settings tried first, e.g. the paper's")

    @model_validator(mode="after")
    def _points_fit(self) -> "SweepSection":
        if len(self.points_to_evaluate) > self.num_samples:
            raise ConfigError(f"points_to_evaluate: {len(self.points_to_evaluate)} points but only "
                              f"{self.num_samples} trials (sweep.num_samples)")
        return self


class SchedulerSection(JobModel):
    """ASHA (asynchronous successive halving) over epochs; ``max_t`` is ``train.epochs``."""

    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="keep the best 1/rf of trials at each rung")
    brackets: int = Field(1, ge=1, description="ASHA brackets (1: plain successive halving)")


class TuneJob(TrainJob):
    """One sweep: a training job (every trial starts from it) plus the three sweep sections;
    parse it with :func:`load_tune_job`.

    Attributes:
        space, sweep, scheduler: the sweep sections (see the module docstring).
    """

    space: SearchSpace = Field(default_factory=SearchSpace)
    sweep: SweepSection = Field(default_factory=SweepSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)

    @model_validator(mode="after")
    def _fits_the_base(self) -> "TuneJob":
        if self.train.validate_every != 1:
            raise ConfigError(f"train.validate_every: a sweep compares trials by val_dice at every epoch; "
                              f"set it to 1 (got {self.train.validate_every})")
        if self.scheduler.grace_period > self.train.epochs:
            raise ConfigError(f"scheduler.grace_period: {self.scheduler.grace_period} epochs exceeds "
                              f"train.epochs ({self.train.epochs})")
        self.space.validate_for(self.model.build())
        for i, point in enumerate(self.sweep.points_to_evaluate):
            self.space.check_point(point, f"sweep.points_to_evaluate[{i}]")
        return self

    @property
    def base(self) -> TrainJob:
        """The training job every trial starts from (its run name and model registration are
        replaced per trial: trials never register a model, the sweep does). The sections are
        shared, already validated, so nothing is parsed again."""
        return TrainJob.model_construct(**{name: getattr(self, name) for name in TrainJob.model_fields})

    @property
    def name(self) -> str:
        """``sweep.name``, or ``tune-<preset>-<variant>-<hash>`` of what the sweep explores."""
        if self.sweep.name:
            return self.sweep.name
        # Hash the absolute store so the name does not depend on the working directory.
        base = {**self.base.to_dict(), "store": local_path(self.store)}
        plain = {"base": base, **{section: getattr(self, section).to_dict() for section in TUNE_SECTIONS}}
        return f"tune-{self.model.preset}-{self.model.variant}-{config_hash(plain, _NAME_EXCLUDES)}"

    @property
    def max_t(self) -> int:
        return self.train.epochs

    @property
    def experiment_path(self) -> str:
        """``<storage_path>/<name>``: Tune's experiment folder (what ``--resume`` restores)."""
        return os.path.join(self.sweep.storage_path, self.name)

    def resolved(self) -> "TuneJob":
        """A copy whose local paths are absolute and whose sweep name is fixed, so trials (which
        run in Tune's per-trial folders, maybe on other nodes) read the same store and state.
        The Train run name stays unset: each trial sets its own."""
        return self.updated({"store": absolute_url(self.store), "run.storage_path": absolute_url(self.run.storage_path),
                             "sweep.name": self.name, "sweep.storage_path": local_path(self.sweep.storage_path)})


def load_tune_job(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = ()) -> TuneJob:
    """Parse and validate a ``TuneJob`` from a YAML file plus ``key=value`` overrides."""
    return load_job(TuneJob, path, overrides)


__all__ = [
    "DEFAULT_SWEEP_STORAGE",
    "SchedulerSection",
    "SweepSection",
    "TUNE_SECTIONS",
    "TuneJob",
    "load_tune_job",
]
