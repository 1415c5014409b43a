"""``TuneJob``: a training config plus the three sweep sections, parsed and checked up front.

A sweep YAML is a training YAML (``store``, ``model``, ``sampling``, ``train``, ... exactly as
``ossnet train`` reads them: every trial starts from it) with three more sections::

    space       what to search (tune.space.SearchSpace)
    sweep       name, trials, seed, concurrency, trial resources, retries, storage
    scheduler   ASHA: grace period, reduction factor, brackets (max_t = train.epochs)

Everything is validated before Ray starts: the training part as ``TrainJob`` does, the space
on its own (unknown names, empty ranges, malformed patch sizes) and against the model every
trial starts from (patch sizes larger than the grid, alpha without a low-res head), and the
settings a sweep depends on (Train workers so Tune sees every epoch, validation every epoch).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from ossnet.config import ConfigError
from pipelines.files import local_path
from pipelines.jobconfig import apply_overrides, config_hash, constrained, load_yaml, parse_section, to_dict
from pipelines.train.job import TrainJob
from tune.space import SearchSpace

DEFAULT_SWEEP_STORAGE = ".ossnet/tune_results"
SWEEP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TUNE_SECTIONS: tuple[str, ...] = ("space", "sweep", "scheduler")
# Settings that do not change what a sweep explores: left out of the default sweep name, so
# more samples, other concurrency or another tracking server continue the same sweep.
_NAME_EXCLUDES = (
    "base.train.validate_every", "base.train.checkpoint_every", "base.train.keep_checkpoints",
    "base.validation.png_cases", "base.data", "base.scaling", "base.run", "base.tracking",
    "sweep.name", "sweep.num_samples", "sweep.max_concurrent_trials", "sweep.trial_cpus",
    "sweep.max_failures", "sweep.storage_path",
)


@dataclass(frozen=True)
class SweepSection:
    """How many trials, how they are drawn and where the sweep keeps its state."""

    name: str | None = constrained(None, help="stable sweep name (default from the config): --resume finds it")
    num_samples: int = constrained(16, ge=1, help="trials in all")
    seed: int = constrained(0, ge=0, help="seed of the TPE sampler")
    startup_trials: int = constrained(5, ge=1, help="random trials before TPE models the results")
    max_concurrent_trials: int | None = constrained(None, ge=1, help="default: as many as the cluster's resources fit")
    trial_cpus: float = constrained(0.5, gt=0.0, help="logical CPUs of each trial's Train driver (the Tune actor)")
    max_failures: int = constrained(0, ge=0, help="Tune retries of a failed trial (0: record the failure, go on)")
    storage_path: str = constrained(DEFAULT_SWEEP_STORAGE, help="Tune experiment state and the trials' Train runs")
    points_to_evaluate: tuple[dict[str, Any], ...] = constrained((), help="settings tried first, e.g. the paper's")

    def validate(self) -> None:
        if self.name is not None and not SWEEP_NAME_RE.match(self.name):
            raise ConfigError(f"sweep.name: {self.name!r} must be 1-100 letters, digits, '.', '_' or '-'")
        if not self.storage_path.strip():
            raise ConfigError("sweep.storage_path: must not be empty")
        if len(self.points_to_evaluate) > self.num_samples:
            raise ConfigError(f"sweep.points_to_evaluate: {len(self.points_to_evaluate)} points but only "
                              f"{self.num_samples} trials (sweep.num_samples)")


@dataclass(frozen=True)
class SchedulerSection:
    """ASHA (asynchronous successive halving) over epochs; ``max_t`` is ``train.epochs``."""

    grace_period: int = constrained(1, ge=1, help="epochs every trial runs before it can be stopped")
    reduction_factor: float = constrained(3.0, gt=1.0, help="keep the best 1/rf of trials at each rung")
    brackets: int = constrained(1, ge=1, help="ASHA brackets (1: plain successive halving)")


@dataclass(frozen=True)
class TuneJob:
    """One sweep; parse it with :func:`load_tune_job`.

    Attributes:
        base: the training job every trial starts from (its run name and model registration
            are replaced per trial: trials never register a model, the sweep does).
        space, sweep, scheduler: the sweep sections.
    """

    base: TrainJob
    space: SearchSpace = field(default_factory=SearchSpace)
    sweep: SweepSection = field(default_factory=SweepSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)

    def validate(self) -> None:
        base = self.base
        if base.train.validate_every != 1:
            raise ConfigError(f"train.validate_every: a sweep compares trials by val_dice at every epoch; "
                              f"set it to 1 (got {base.train.validate_every})")
        if self.scheduler.grace_period > base.train.epochs:
            raise ConfigError(f"scheduler.grace_period: {self.scheduler.grace_period} epochs exceeds "
                              f"train.epochs ({base.train.epochs})")
        self.space.validate_for(base.model.build())
        for i, point in enumerate(self.sweep.points_to_evaluate):
            self.space.check_point(point, f"sweep.points_to_evaluate[{i}]")

    @property
    def name(self) -> str:
        """``sweep.name``, or ``tune-<preset>-<variant>-<hash>`` of what the sweep explores."""
        if self.sweep.name:
            return self.sweep.name
        # Hash the absolute store so the name does not depend on the working directory.
        anchored = replace(self, base=replace(self.base, store=local_path(self.base.store)))
        return f"tune-{self.base.model.preset}-{self.base.model.variant}-{config_hash(anchored, _NAME_EXCLUDES)}"

    @property
    def max_t(self) -> int:
        return self.base.train.epochs

    @property
    def experiment_path(self) -> str:
        """``<storage_path>/<name>``: Tune's experiment folder (what ``--resume`` restores)."""
        return os.path.join(self.sweep.storage_path, self.name)

    def resolved(self) -> TuneJob:
        """A copy whose local paths are absolute and whose sweep name is fixed, so trials (which
        run in Tune's per-trial folders, maybe on other nodes) read the same store and state."""
        base = self.base.resolved()  # absolute store and Train storage; the run name is per trial
        storage = local_path(self.sweep.storage_path)
        return replace(self, base=base, sweep=replace(self.sweep, name=self.name, storage_path=storage))


def tune_job_from_dict(data: Mapping[str, Any]) -> TuneJob:
    """Parse a flat sweep mapping (training sections + ``space``/``sweep``/``scheduler``).

    Raises:
        ConfigError: the first bad field, by its dotted path (e.g. ``space.lr.low``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of sections, got {type(data).__name__}")
    train_keys = [f for f in TrainJob.__dataclass_fields__]
    unknown = [k for k in data if k not in train_keys and k not in TUNE_SECTIONS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field; expected one of: {', '.join([*train_keys, *TUNE_SECTIONS])}")
    train_part = {k: v for k, v in data.items() if k not in TUNE_SECTIONS}
    base = parse_section(TrainJob, train_part)
    space = parse_section(SearchSpace, data.get("space"), "space")
    sweep = parse_section(SweepSection, data.get("sweep"), "sweep")
    scheduler = parse_section(SchedulerSection, data.get("scheduler"), "scheduler")
    job = TuneJob(base=base, space=space, sweep=sweep, scheduler=scheduler)
    job.validate()
    return job


def tune_job_to_dict(job: TuneJob) -> dict[str, Any]:
    """The flat mapping :func:`tune_job_from_dict` reads (for YAML dumps and ``--address``)."""
    out = to_dict(job.base)
    out.update({name: to_dict(getattr(job, name)) for name in TUNE_SECTIONS})
    return out


def load_tune_job(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = ()) -> TuneJob:
    """Parse and validate a ``TuneJob`` from a YAML file plus ``key=value`` overrides."""
    data: dict[str, Any] = copy.deepcopy(load_yaml(path)) if path is not None else {}
    return tune_job_from_dict(apply_overrides(data, overrides))


__all__ = [
    "DEFAULT_SWEEP_STORAGE",
    "SchedulerSection",
    "SweepSection",
    "TUNE_SECTIONS",
    "TuneJob",
    "load_tune_job",
    "tune_job_from_dict",
    "tune_job_to_dict",
]
