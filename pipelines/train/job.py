"""``TrainJob``: everything a training run needs, parsed from YAML and checked before it starts.

Sections (YAML top-level keys)::

    store        the Zarr store URL or path (train and val splits)
    model        variant, preset, activation, patch size, CBN normalisation, grid override
    sampling     n_points, border_ratio, band_width          (ossnet.config.SamplingConfig)
    augment      flip / brightness / noise probabilities     (ossnet.config.AugmentConfig)
    train        epochs, global batch size, optimiser and schedule, alpha, seed, AMP,
                 validation / checkpoint cadence, checkpoints kept
    validation   MISE mode, chunk size, cases, PNG overlays
    data         Ray Data sampling tasks: CPUs per task, concurrency, object-store budget
    scaling      num_workers (0 = in-process), use_gpu, resources_per_worker, max_failures
    run          name (default derived from the config), storage_path for Ray Train
    tracking     MLflow on/off, tracking URI, experiment, registered model name

The default run name hashes every setting that changes what is learned, and leaves out the
ones that do not (epochs, cadences, scaling, tracking): re-running the same command, or the
same command with more epochs, resumes the same Ray Train run and the same MLflow run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ossnet.config import (
    ACTIVATIONS,
    CBN_NORMS,
    ENCODER_NORMS,
    PRESETS,
    VARIANTS,
    AugmentConfig,
    ConfigError,
    ModelConfig,
    SamplingConfig,
    model_config,
)
from ossnet.inference import MODES
from ossnet.training import OPTIMIZERS
from pipelines.files import absolute_url
from pipelines.jobconfig import config_hash, constrained, load_job

if TYPE_CHECKING:
    from pipelines.store import Store

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_STORAGE_PATH = ".ossnet/ray_results"
# Settings that do not change what a run learns: left out of the default run name.
_NAME_EXCLUDES = (
    "train.epochs", "train.validate_every", "train.checkpoint_every", "train.keep_checkpoints",
    "validation", "data", "scaling", "run", "tracking",
)


_MODEL_FIELDS = {
    "patch.size": "model.patch_size", "patch.kernel": "model.patch_size", "decoder.cbn_norm": "model.cbn_norm",
    "encoder.norm": "model.encoder_norm",
}


@dataclass(frozen=True)
class ModelSection:
    """Which OSS-Net to train (see ``ossnet.config.model_config``)."""

    variant: str = constrained("C", choices=VARIANTS, help="paper variant")
    preset: str = constrained("brats", choices=PRESETS, help="dataset preset (grid, widths)")
    activation: str = constrained("leaky_relu", choices=ACTIVATIONS)
    patch_size: int | None = constrained(None, ge=1, help="patch edge (odd); default the variant's 7")
    cbn_norm: str = constrained("layer", choices=CBN_NORMS,
                                help="decoder norm: layer (no batch statistics), feature/pooled (the paper's batch norm)")
    encoder_norm: str = constrained("batch", choices=ENCODER_NORMS, help="encoder norm: batch (the paper), instance, group")
    volume_shape: tuple[int, int, int] | None = constrained(None, item_ge=2, help="grid override (X, Y, Z)")

    def build(self, in_channels: int | None = None) -> ModelConfig:
        """The validated ``ModelConfig`` (``in_channels`` from the store, else the preset's)."""
        return model_config(
            self.variant, self.preset, activation=self.activation, patch_size=self.patch_size,
            in_channels=in_channels, volume_shape=self.volume_shape, cbn_norm=self.cbn_norm,
            encoder_norm=self.encoder_norm,
        )

    def validate(self) -> None:
        try:
            self.build()
        except ConfigError as exc:  # name the YAML field, not the ModelConfig one
            name, _, message = str(exc).partition(": ")
            name = _MODEL_FIELDS.get(name, name if name.startswith("model.") else f"model.{name}")
            raise ConfigError(f"{name}: {message}") from None


@dataclass(frozen=True)
class TrainSection:
    """Optimisation and cadence. ``batch_size`` is global: volumes per step over all workers."""

    epochs: int = constrained(50, ge=1)
    batch_size: int = constrained(8, ge=1, help="volumes per optimiser step, all workers together")
    samples_per_case: int = constrained(1, ge=1, help="rows drawn from one read of a case per epoch")
    alpha: float = constrained(0.1, ge=0.0, help="weight of the auxiliary low-res loss")
    optimizer: str = constrained("radam_lookahead", choices=OPTIMIZERS)
    lr: float = constrained(3e-4, gt=0.0)
    milestones: tuple[int, ...] = constrained((20, 30), item_ge=1, help="epochs where the LR drops")
    gamma: float = constrained(0.1, gt=0.0, le=1.0)
    mixed_precision: bool = constrained(True, help="fp16 autocast + GradScaler (GPU only)")
    seed: int = constrained(0, ge=0)
    validate_every: int = constrained(1, ge=1, help="validate every k epochs (and the last)")
    checkpoint_every: int = constrained(1, ge=1, help="checkpoint every k epochs (and the last)")
    keep_checkpoints: int = constrained(3, ge=1, help="best checkpoints kept by val_dice (plus the latest)")

    def validate(self) -> None:
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"train.milestones: must be strictly increasing, got {list(self.milestones)}")

    def is_validation_epoch(self, epoch: int) -> bool:
        """Validate at every ``validate_every``-th epoch, the last one and every checkpoint epoch
        (Ray ranks checkpoints by ``val_dice``, so each checkpoint carries one)."""
        return epoch % self.validate_every == 0 or self.is_checkpoint_epoch(epoch)

    def is_checkpoint_epoch(self, epoch: int) -> bool:
        return epoch % self.checkpoint_every == 0 or epoch == self.epochs


@dataclass(frozen=True)
class ValidationSection:
    """Dense full-resolution validation through the MISE inference path."""

    mode: str = constrained("mise_lowres", choices=MODES)
    chunk_points: int = constrained(2**14, ge=1)
    split: str = constrained("val", choices=("val", "train"),
                             help="cases to validate on: the val split, or the training cases (an overfit check)")
    max_cases: int | None = constrained(None, ge=1, help="validate on the first N cases of that split only")
    png_cases: int = constrained(1, ge=0, help="slice overlays logged per validation")
    n_points: int | None = constrained(None, ge=1, help="points of the auxiliary point metrics (default sampling.n_points)")


@dataclass(frozen=True)
class DataSection:
    """Ray Data sampling tasks feeding the workers."""

    cpus_per_task: float = constrained(1.0, gt=0.0)
    max_tasks: int | None = constrained(None, ge=1, help="concurrent sampling tasks (default: as CPUs allow)")
    object_store_mb: int = constrained(1024, ge=16, help="object-store budget of the stream")
    prefetch_batches: int = constrained(1, ge=0)


@dataclass(frozen=True)
class ScalingSection:
    """Workers. ``num_workers: 0`` runs the loop in the driver process (Ray Train local mode:
    no worker actors, no failure retries; checkpoints are kept by ossnet itself)."""

    num_workers: int = constrained(1, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = constrained(None, help="e.g. {CPU: 0.5} (default {CPU: 1})")
    max_failures: int = constrained(1, ge=-1, help="worker-group restarts from the last checkpoint (-1: unlimited)")

    def validate(self) -> None:
        for key, value in (self.resources_per_worker or {}).items():
            if value < 0 or (key == "CPU" and value == 0):
                raise ConfigError(f"scaling.resources_per_worker.{key}: must be > 0, got {value}")

    @property
    def world_size(self) -> int:
        return max(self.num_workers, 1)

    def worker_resources(self) -> dict[str, float]:
        """Resources per worker with the defaults filled in (1 CPU; 1 GPU with ``use_gpu``)."""
        res = {"CPU": 1.0, **(self.resources_per_worker or {})}
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


@dataclass(frozen=True)
class RunSection:
    name: str | None = constrained(None, help="Ray Train run name = MLflow run key (default from the config)")
    storage_path: str = constrained(DEFAULT_STORAGE_PATH, help="where Ray Train keeps checkpoints")

    def validate(self) -> None:
        if self.name is not None and not RUN_NAME_RE.match(self.name):
            raise ConfigError(f"run.name: {self.name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        if not self.storage_path.strip():
            raise ConfigError("run.storage_path: must not be empty")


@dataclass(frozen=True)
class TrackingSection:
    enabled: bool = True
    uri: str | None = constrained(None, help="tracking URI (default $MLFLOW_TRACKING_URI, else .ossnet/mlflow.db)")
    experiment: str = "ossnet"
    model_name: str = "ossnet"
    register: bool = constrained(True, help="register the best model and promote it if it beats the champion")

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment: must not be empty")
        if not self.model_name.strip():
            raise ConfigError("tracking.model_name: must not be empty")


@dataclass(frozen=True)
class TrainJob:
    """One training job; parse it with :func:`load_train_job`."""

    store: str
    model: ModelSection = field(default_factory=ModelSection)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def validate(self) -> None:
        if not self.store.strip():
            raise ConfigError("store: must not be empty")
        workers = self.scaling.world_size
        if self.train.batch_size % workers:
            raise ConfigError(
                f"train.batch_size: must be a multiple of scaling.num_workers ({workers}), got {self.train.batch_size}"
            )

    @property
    def run_name(self) -> str:
        """``run.name``, or ``<preset>-<variant>-<hash>`` of the settings that shape learning."""
        if self.run.name:
            return self.run.name
        return f"{self.model.preset}-{self.model.variant}-{config_hash(self, _NAME_EXCLUDES)}"

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.scaling.world_size

    def resolved(self) -> TrainJob:
        """A copy with local paths made absolute (Ray workers run in other directories) and the
        run name fixed, so the job means the same thing wherever it is executed."""
        from dataclasses import replace

        job = replace(self, store=absolute_url(self.store))
        run = replace(job.run, name=job.run_name, storage_path=absolute_url(job.run.storage_path))
        return replace(job, run=run)


def load_train_job(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = ()) -> TrainJob:
    """Parse and validate a ``TrainJob`` from a YAML file plus ``key=value`` overrides."""
    return load_job(TrainJob, path, overrides)


@dataclass(frozen=True)
class StoreFacts:
    """What a job learned about its store in the preflight check."""

    model: ModelConfig
    modalities: tuple[str, ...]
    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    zscore_mask: str
    resample: str = "none"
    target_spacing: tuple[float, float, float] | None = None


def check_against_store(job: TrainJob, store: Store | None = None) -> StoreFacts:
    """Open the store and check that the job fits it (grid, channels, non-empty splits).

    Raises:
        ConfigError: naming the store and the mismatch.
    """
    from pipelines.data import split_case_ids
    from pipelines.store import StoreError, open_store

    try:
        store = store or open_store(job.store)
    except StoreError as exc:
        raise ConfigError(f"store: {exc}") from None
    modalities = tuple(store.modalities)
    try:
        model = job.model.build(in_channels=len(modalities))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (store {job.store})") from None
    if tuple(store.volume_shape) != tuple(model.volume_shape):
        raise ConfigError(
            f"model.preset: {job.model.preset} works on a {tuple(model.volume_shape)} grid but the store "
            f"{job.store} holds {tuple(store.volume_shape)} (ingest with the same preset, or set model.volume_shape)"
        )
    splits = {}
    for split in sorted({"train", job.validation.split}, reverse=True):
        try:
            splits[split] = tuple(split_case_ids(store, split, None))
        except ValueError:
            raise ConfigError(f"store: {job.store} has no complete cases in the {split!r} split") from None
    val = splits[job.validation.split]
    val = val[: job.validation.max_cases] if job.validation.max_cases else val
    rows = len(splits["train"]) * job.train.samples_per_case
    if rows < job.scaling.world_size:
        raise ConfigError(
            f"scaling.num_workers: {job.scaling.num_workers} workers but only {rows} training rows per epoch"
        )
    if math.prod(model.volume_shape) <= 0:  # pragma: no cover - guarded by ModelConfig.validate
        raise ConfigError("model.volume_shape: empty grid")
    return StoreFacts(
        model=model, modalities=modalities, train_cases=splits["train"], val_cases=tuple(val),
        zscore_mask=str(store.info.get("zscore_mask", "nonzero")),
        resample=str(store.info.get("resample") or "none"),
        target_spacing=tuple(store.info["target_spacing"]) if store.info.get("target_spacing") else None,
    )


__all__ = [
    "DEFAULT_STORAGE_PATH",
    "DataSection",
    "ModelSection",
    "RunSection",
    "ScalingSection",
    "StoreFacts",
    "TrackingSection",
    "TrainJob",
    "TrainSection",
    "ValidationSection",
    "check_against_store",
    "load_train_job",
]
