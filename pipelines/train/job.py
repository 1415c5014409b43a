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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Optional

from pydantic import AfterValidator, Field, model_validator

from ossnet.config import (
    ACTIVATIONS,
    CBN_NORMS,
    ENCODER_NORMS,
    PRESETS,
    VARIANTS,
    AugmentConfig,
    ConfigError,
    OPTIMIZERS,
    ModelConfig,
    SamplingConfig,
    model_config,
)
from ossnet.inference_options import MODES
from ossnet.targets import TARGET_PRESETS, TargetSpec
from ossnet_pipelines.files import absolute_url
from ossnet_pipelines.jobconfig import Checked, Job, JobModel, NonBlank, config_hash, load_job, safe_name

if TYPE_CHECKING:
    from ossnet_pipelines.store import Store

DEFAULT_STORAGE_PATH = ".ossnet/ray_results"
# Settings that do not change what a run learns: left out of the default run name.
_NAME_EXCLUDES = (
    "train.epochs", "train.validate_every", "train.checkpoint_every", "train.keep_checkpoints",
    "validation", "data", "scaling", "run", "tracking",
)


def _odd(size: int) -> int:
    if size % 2 == 0:
        raise ValueError(f"must be an odd integer >= 1, got {size}")
    return size


class ModelSection(JobModel):
    """Which OSS-Net to train (see ``ossnet.config.model_config``)."""

    variant: Literal[VARIANTS] = Field("C", description="paper variant")
    preset: Literal[PRESETS] = Field("brats", description="dataset preset (grid, widths)")
    activation: Literal[ACTIVATIONS] = "leaky_relu"
    patch_size: Optional[Annotated[int, Field(ge=1), AfterValidator(_odd)]] = Field(
        None, description="patch edge (odd); default the variant's 7")
    cbn_norm: Literal[CBN_NORMS] = Field(
        "layer", description="decoder norm: layer (no batch statistics), feature/pooled (the paper's batch norm)")
    encoder_norm: Literal[ENCODER_NORMS] = Field("batch", description="encoder norm: batch (the paper), instance, group")
    volume_shape: Optional[tuple[Annotated[int, Field(ge=2)], Annotated[int, Field(ge=2)], Annotated[int, Field(ge=2)]]] = \
        Field(None, description="grid override (X, Y, Z)")
    targets: Optional[Literal[tuple(TARGET_PRESETS)]] = Field(  # type: ignore[valid-type]
        None, description="target map (ossnet.targets); default the store's, which it must match")

    def build(self, in_channels: int | None = None, targets: TargetSpec | None = None) -> ModelConfig:
        """The validated ``ModelConfig`` (``in_channels`` and ``targets`` from the store, else the
        preset's channels and this section's target map)."""
        if targets is None and self.targets is not None:
            targets = TARGET_PRESETS[self.targets]
        return model_config(
            self.variant, self.preset, activation=self.activation, patch_size=self.patch_size,
            in_channels=in_channels, volume_shape=self.volume_shape, cbn_norm=self.cbn_norm,
            encoder_norm=self.encoder_norm, targets=targets,
        )

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSection":
        self.build()  # a ConfigError names the ModelConfig field (e.g. "patch.kernel")
        return self


class TrainSection(JobModel):
    """Optimisation and cadence. ``batch_size`` is global: volumes per step over all workers."""

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1, description="volumes per optimiser step, all workers together")
    samples_per_case: int = Field(1, ge=1, description="rows drawn from one read of a case per epoch")
    alpha: float = Field(0.1, ge=0.0, description="weight of the auxiliary low-res loss")
    optimizer: Literal[OPTIMIZERS] = "radam_lookahead"
    lr: float = Field(3e-4, gt=0.0)
    milestones: tuple[Annotated[int, Field(ge=1)], ...] = Field((20, 30), description="epochs where the LR drops")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    mixed_precision: bool = Field(True, description="fp16 autocast + GradScaler (GPU only)")
    seed: int = Field(0, ge=0)
    validate_every: int = Field(1, ge=1, description="validate every k epochs (and the last)")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every k epochs (and the last)")
    keep_checkpoints: int = Field(3, ge=1, description="best checkpoints kept by val_dice (plus the latest)")
    target_weights: Optional[tuple[Annotated[float, Field(ge=0.0)], ...]] = Field(
        None, description="loss weight per model output of a multi-target model (default equal)")

    @model_validator(mode="after")
    def _increasing(self) -> "TrainSection":
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"milestones: must be strictly increasing, got {list(self.milestones)}")
        return self

    def is_validation_epoch(self, epoch: int) -> bool:
        """Validate at every ``validate_every``-th epoch, the last one and every checkpoint epoch
        (Ray ranks checkpoints by ``val_dice``, so each checkpoint carries one)."""
        return epoch % self.validate_every == 0 or self.is_checkpoint_epoch(epoch)

    def is_checkpoint_epoch(self, epoch: int) -> bool:
        return epoch % self.checkpoint_every == 0 or epoch == self.epochs


class ValidationSection(JobModel):
    """Dense full-resolution validation through the MISE inference path."""

    mode: Literal[MODES] = "mise_lowres"
    chunk_points: int = Field(2**14, ge=1)
    split: Literal["val", "train"] = Field(
        "val", description="cases to validate on: the val split, or the training cases (an overfit check)")
    max_cases: Optional[int] = Field(None, ge=1, description="validate on the first N cases of that split only")
    png_cases: int = Field(1, ge=0, description="slice overlays logged per validation")
    n_points: Optional[int] = Field(None, ge=1,
                                    description="points of the auxiliary point metrics (default sampling.n_points)")
    objective: str = Field("mean", description="multi-target models: val_dice is the mean Dice over the targets "
                                               "('mean') or one target's (its name, e.g. 'et')")


class DataSection(JobModel):
    """Ray Data sampling tasks feeding the workers."""

    cpus_per_task: float = Field(1.0, gt=0.0)
    max_tasks: Optional[int] = Field(None, ge=1, description="concurrent sampling tasks (default: as CPUs allow)")
    object_store_mb: int = Field(1024, ge=16, description="object-store budget of the stream")
    prefetch_batches: int = Field(1, ge=0)


class ScalingSection(JobModel):
    """Workers. ``num_workers: 0`` runs the loop in the driver process (Ray Train local mode:
    no worker actors, no failure retries; checkpoints are kept by ossnet itself)."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    resources_per_worker: Optional[dict[str, float]] = Field(None, description="e.g. {CPU: 0.5} (default {CPU: 1})")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")

    @model_validator(mode="after")
    def _positive_resources(self) -> "ScalingSection":
        for key, value in (self.resources_per_worker or {}).items():
            if value < 0 or (key == "CPU" and value == 0):
                raise ConfigError(f"resources_per_worker.{key}: must be > 0, got {value}")
        return self

    @property
    def world_size(self) -> int:
        return max(self.num_workers, 1)

    def worker_resources(self) -> dict[str, float]:
        """Resources per worker with the defaults filled in (1 CPU; 1 GPU with ``use_gpu``)."""
        res = {"CPU": 1.0, **(self.resources_per_worker or {})}
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


class RunSection(JobModel):
    name: Optional[safe_name(128)] = Field(  # type: ignore[valid-type]
        None, description="Ray Train run name = MLflow run key (default from the config)")
    storage_path: NonBlank = Field(DEFAULT_STORAGE_PATH, description="where Ray Train keeps checkpoints")


with warnings.catch_warnings():  # "register" is also ABCMeta.register: the YAML key is public, keep it
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class TrackingSection(JobModel):
        """MLflow: on/off, where, which experiment and registered model."""

        enabled: bool = True
        uri: Optional[str] = Field(None,
                                   description="tracking URI (default $MLFLOW_TRACKING_URI, else .ossnet/mlflow.db)")
        experiment: NonBlank = "ossnet"
        model_name: NonBlank = "ossnet"
        register: bool = Field(True, description="register the best model; champion moves to it if its "
                                                 "test-split Dice is the best")
        system_metrics: bool = Field(False, description="MLflow system metrics (system/*) of the process that "
                                                         "trains: CPU, memory, disk, network, GPU with pynvml")


class TrainJob(Job):
    """One training job; parse it with :func:`load_train_job`."""

    store: NonBlank
    model: ModelSection = Field(default_factory=ModelSection)
    sampling: Checked[SamplingConfig] = Field(default_factory=SamplingConfig)
    augment: Checked[AugmentConfig] = Field(default_factory=AugmentConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    data: DataSection = Field(default_factory=DataSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> "TrainJob":
        workers = self.scaling.world_size
        if self.train.batch_size % workers:
            raise ConfigError(
                f"train.batch_size: must be a multiple of scaling.num_workers ({workers}), got {self.train.batch_size}"
            )
        return self

    @property
    def run_name(self) -> str:
        """``run.name``, or ``<preset>-<variant>-<hash>`` of the settings that shape learning."""
        if self.run.name:
            return self.run.name
        return f"{self.model.preset}-{self.model.variant}-{config_hash(self, _NAME_EXCLUDES)}"

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.scaling.world_size

    def resolved(self) -> "TrainJob":
        """A copy with local paths made absolute (Ray workers run in other directories) and the
        run name fixed, so the job means the same thing wherever it is executed."""
        return self.updated({"store": absolute_url(self.store), "run.name": self.run_name,
                             "run.storage_path": absolute_url(self.run.storage_path)})


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
    test_cases: tuple[str, ...] = ()
    resample: str = "none"
    target_spacing: tuple[float, float, float] | None = None


def check_against_store(job: TrainJob, store: Store | None = None) -> StoreFacts:
    """Open the store and check that the job fits it (grid, channels, non-empty splits).

    Raises:
        ConfigError: naming the store and the mismatch.
    """
    from ossnet_pipelines.data import split_case_ids
    from ossnet_pipelines.store import StoreError, open_store

    try:
        store = store or open_store(job.store)
    except StoreError as exc:
        raise ConfigError(f"store: {exc}") from None
    modalities = tuple(store.modalities)
    try:
        model = job.model.build(in_channels=len(modalities), targets=store.targets)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (store {job.store})") from None
    targets = model.targets
    if job.model.targets is not None and TARGET_PRESETS[job.model.targets] != targets:
        raise ConfigError(f"model.targets: {job.model.targets} but the store {job.store} holds {targets.describe()} "
                          "(ingest with --targets, or leave model.targets unset)")
    if job.train.target_weights is not None and len(job.train.target_weights) != targets.n_outputs:
        raise ConfigError(f"train.target_weights: {len(job.train.target_weights)} weights for the "
                          f"{targets.n_outputs} outputs of {targets.describe()}")
    if job.validation.objective not in ("mean", *targets.names):
        raise ConfigError(f"validation.objective: must be 'mean' or a target of the store "
                          f"({', '.join(targets.names)}), got {job.validation.objective!r}")
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
    try:  # the promotion evidence: every complete labelled test case
        test = tuple(split_case_ids(store, "test", None))
    except ValueError:
        test = ()
    rows = len(splits["train"]) * job.train.samples_per_case
    if rows < job.scaling.world_size:
        raise ConfigError(
            f"scaling.num_workers: {job.scaling.num_workers} workers but only {rows} training rows per epoch"
        )
    if math.prod(model.volume_shape) <= 0:  # pragma: no cover - guarded by ModelConfig.validate
        raise ConfigError("model.volume_shape: empty grid")
    return StoreFacts(
        model=model, modalities=modalities, train_cases=splits["train"], val_cases=tuple(val), test_cases=test,
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
