"""Training data out of the Zarr store: a Ray Data stream and a plain PyTorch Dataset.

Both paths share one per-case function, :func:`sample_case_rows`: given a case's arrays it draws,
for each repeat ``r``, a generator from ``SeedSequence([seed, epoch, case_key(case_id), r])``
and calls the pure :func:`ossnet.sampling.training_sample`. A row therefore depends only on
(seed, epoch, case, repeat), never on the process, task or order that produced it: the Ray
stream and the torch Dataset yield the same rows for the same seed, a new epoch gives new
samples, and any epoch can be regenerated. ``case_key`` is a stable 64-bit hash of the case id,
so adding cases to the store does not change the samples of the others.

Row columns (all numeric; batches add a leading ``B``)::

    image_lowres  (C, *model.lowres_input_shape) float32   encoder input (augmented)
    points        (n, 3) float32 in [-1, 1]                  normalised query points
    patches       (n, Cp, k, k, k) float32                   omitted for O-Net (patch.size 0)
    labels        (n,) float32                               occupancy at the points
    label_lowres  (*model.latent_shape) float32              max-pooled reference

Epochs under Ray Train V2. A ``ray.data.Dataset`` is a lazy plan: Train V2 splits it once
(``streaming_split(world_size, equal=True)``) and every ``shard.iter_torch_batches()`` call
re-executes the whole plan, starting only when all ranks have reached the split coordinator's
barrier. A plan with a fixed epoch would thus replay the same samples every epoch. So the run
keeps one dataset and the sampling task reads the epoch when it runs, from an
:class:`EpochClock` (a zero-CPU Ray actor) that every rank sets before iterating::

    clock = EpochClock.create(world_size=n)                              # driver
    ds = build_training_dataset(url, "train", model, sampling, augment, epoch=clock, seed=s)
    TorchTrainer(loop, datasets={"train": ds}, train_loop_config={"clock": clock, ...},
                 dataset_config=DataConfig(execution_options={"train": ingest_options()}))
    # in loop(config), on every rank:
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, n_epochs):            # start_epoch from the checkpoint
        config["clock"].set(epoch, rank=ray.train.get_context().get_world_rank())
        for batch in shard.iter_torch_batches(batch_size=b): ...

The clock reports the minimum epoch over ranks: tasks still producing a slow rank's epoch ``e``
never see ``e + 1`` from a fast rank, and the next execution starts only after every rank has
set ``e + 1`` and reached the barrier, so all of its tasks see ``e + 1``. Resuming at epoch
``k`` is just ``set(k)``; the rows are the same as in an uninterrupted run. With an int epoch
the dataset is fixed (same rows on each iteration): for one-off use, evaluation and tests.

Memory. Each task reads one case (``samples_per_case`` rows amortise the read) and blocks
are streamed, so the object store holds only the rows in flight: :func:`ingest_options` caps
the dataset's object-store budget and CPUs (Train V2 replaces a dataset's own execution options
with ``DataConfig``'s, hence the separate helper). At the BraTS grid with 2**14 points a row is
about 111 MB (patches 90 MB, low-res image 21 MB); see ``bench/data.py`` for measurements.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ossnet.config import AugmentConfig, ModelConfig, SamplingConfig
from ossnet.sampling import training_sample
from ossnet_pipelines.store import Store, open_store

if TYPE_CHECKING:
    import ray.data
    from ray.actor import ActorHandle
    from ray.data import ExecutionOptions

log = logging.getLogger(__name__)

RowFn = Callable[[Mapping[str, np.ndarray], str, int, "SampleSpec"], "list[dict[str, np.ndarray]]"]
"""``(case arrays, case_id, epoch, spec) -> rows``: the per-case sampling function."""

# Resident size of an idle Ray worker after importing torch, zarr and scipy (measured ~480 MiB).
_WORKER_PROCESS_BYTES = 512 << 20

ROW_KEYS: tuple[str, ...] = ("image_lowres", "points", "patches", "labels", "label_lowres")
"""Columns of a training row, in order (``patches`` absent for models without patches)."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides a training row besides the case data, epoch and repeat.

    Attributes:
        model: model config (grid, low-res shapes, patch size).
        sampling: point count, border ratio, band width.
        augment: augmentation probabilities and magnitudes.
        seed: base seed of the run.
        samples_per_case: rows drawn from one read of a case per epoch.
        stored_band: read the store's border band (when it was built with the sampling band
            width) instead of deriving it from the label in every task.
    """

    model: ModelConfig
    sampling: SamplingConfig
    augment: AugmentConfig
    seed: int = 0
    samples_per_case: int = 1
    stored_band: bool = False

    def __post_init__(self) -> None:
        self.model.validate()
        self.sampling.validate()
        self.augment.validate()
        if self.samples_per_case < 1:
            raise ValueError(f"samples_per_case: must be >= 1, got {self.samples_per_case}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")

    @property
    def arrays(self) -> tuple[str, ...]:
        """Store arrays a training task reads (the border band only for border sampling)."""
        if self.stored_band and self.sampling.border_ratio > 0:
            return ("image", "label", "border")
        return ("image", "label")

    def task_memory_bytes(self) -> int:
        """Rough peak memory of one sampling task: the worker process itself (Python, torch,
        zarr), the case in float16 and float32, the augmented copy and noise field, the rows."""
        voxels = math.prod(self.model.volume_shape)
        image = self.model.encoder.in_channels * voxels
        n = self.sampling.n_points
        row = 4 * (n * (4 + self.model.patch_channels * self.model.patch.size**3)
                   + self.model.encoder.in_channels * math.prod(self.model.lowres_input_shape))
        return int(_WORKER_PROCESS_BYTES + image * (2 + 4 * 3) + voxels * 3 + 2 * row * self.samples_per_case)

    @classmethod
    def for_store(
        cls, store: Store, model: ModelConfig, sampling: SamplingConfig, augment: AugmentConfig, seed: int, samples_per_case: int
    ) -> SampleSpec:
        """A spec that uses the store's border band when its width matches ``sampling``'s."""
        if tuple(store.volume_shape) != tuple(model.volume_shape):
            raise ValueError(f"{store.url}: store grid {store.volume_shape} != model volume_shape {model.volume_shape}")
        if len(store.modalities) != model.encoder.in_channels:
            raise ValueError(f"{store.url}: {len(store.modalities)} modalities != model encoder.in_channels "
                             f"{model.encoder.in_channels}")
        stored = sampling.border_ratio > 0 and store.band_width == sampling.band_width
        if sampling.border_ratio > 0 and not stored:
            log.info("%s: stored band width %d != sampling band width %d; deriving the band per task",
                     store.url, store.band_width, sampling.band_width)
        return cls(model, sampling, augment, seed, samples_per_case, stored_band=stored)


def case_key(case_id: str) -> int:
    """A stable non-negative 64-bit integer for a case id (seeds must not depend on order)."""
    return int.from_bytes(hashlib.blake2b(case_id.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, case_id: str, repeat: int) -> np.random.Generator:
    """The generator for one training row: ``SeedSequence([seed, epoch, case_key, repeat])``."""
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch}")
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, case_key(case_id), repeat]))


def sample_case_rows(
    arrays: Mapping[str, np.ndarray], case_id: str, epoch: int, spec: SampleSpec, repeats: Sequence[int] | None = None
) -> list[dict[str, np.ndarray]]:
    """Training rows from one case: the one per-case function of both data paths.

    Args:
        arrays: the case as read from the store: ``image`` (C, X, Y, Z) on the model grid,
            ``label`` (X, Y, Z), and ``border`` (X, Y, Z) when border sampling is on.
        case_id: the case's id (part of the seed).
        epoch: training epoch (part of the seed).
        spec: what to sample.
        repeats: which repeats to draw (default ``range(spec.samples_per_case)``).

    Returns:
        One dict per repeat with the ``ROW_KEYS`` columns described in the module docstring.
    """
    image = np.asarray(arrays["image"], dtype=np.float32)
    label = np.asarray(arrays["label"])
    expected = (spec.model.encoder.in_channels, *spec.model.volume_shape)
    if image.shape != expected:
        raise ValueError(f"case {case_id!r}: image shape {image.shape} does not match the model grid {expected}")
    band = None
    if "border" in spec.arrays:
        if "border" not in arrays:
            raise ValueError(f"case {case_id!r}: border sampling with the stored band, but no 'border' array was read")
        band = np.asarray(arrays["border"]).astype(bool, copy=False)
    rows = []
    for repeat in range(spec.samples_per_case) if repeats is None else repeats:
        rng = sample_rng(spec.seed, epoch, case_id, repeat)
        row = training_sample(image, label, spec.model, spec.sampling, spec.augment, rng, band=band)
        rows.append({k: np.ascontiguousarray(row[k]) for k in ROW_KEYS if k in row})
    return rows


def load_validation_case(store: Store | str, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A case at the model grid for validation and dense Dice.

    Args:
        store: an open store or its URL.
        case_id: a complete case.

    Returns:
        ``image`` (C, X, Y, Z) float32 normalised, ``label`` (X, Y, Z) uint8 {0, 1}.
    """
    if isinstance(store, str):
        store = cached_store(store)
    arrays = store.read_case(case_id, arrays=("image", "label"))
    return np.asarray(arrays["image"], dtype=np.float32), np.asarray(arrays["label"], dtype=np.uint8)


def collate_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch: each column gains a leading ``B`` dimension."""
    if not rows:
        raise ValueError("collate_rows: empty batch")
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


# --------------------------------------------------------------------------- store access

_STORES: dict[str, Store] = {}


def cached_store(url: str) -> Store:
    """The store at ``url``, opened once per process (Ray reuses worker processes)."""
    store = _STORES.get(url)
    if store is None:
        store = _STORES[url] = open_store(url)
    return store


def split_case_ids(store: Store, split: str | None, case_ids: Sequence[str] | None) -> list[str]:
    """The complete cases to sample: ``case_ids`` (checked) or the split's, sorted.

    The manifest lists only complete cases; the completion flags are checked as well, so a
    case being rewritten under a stale manifest is left out rather than failing a task later.
    """
    scanned = store.scan_cases()
    complete = {cid for cid, attrs in scanned.items() if attrs.get("complete") is True}
    listed = store.case_ids(split)
    incomplete = [c for c in listed if c not in complete]
    if incomplete:
        log.warning("%s: skipping %d listed but incomplete cases: %s", store.url, len(incomplete), ", ".join(incomplete[:5]))
    unlabelled = [c for c in listed if c in complete and scanned[c].get("has_label") is False]
    if unlabelled:
        log.warning("%s: skipping %d cases without a label: %s", store.url, len(unlabelled), ", ".join(unlabelled[:5]))
    available = [c for c in listed if c in complete and c not in unlabelled]
    if case_ids is None:
        ids = sorted(available)
    else:
        known = set(available)
        missing = [c for c in case_ids if c not in known]
        if missing:
            raise ValueError(f"case_ids: not complete cases of split {split!r} in the store: {', '.join(missing[:5])}")
        ids = list(case_ids)
    if not ids:
        raise ValueError(f"split {split!r}: the store has no complete cases")
    return ids


# --------------------------------------------------------------------------- PyTorch path


class CaseSampleDataset(torch.utils.data.Dataset):
    """Map-style dataset of training rows for single-process (or DataLoader) training.

    Item ``i`` is repeat ``i % samples_per_case`` of case ``i // samples_per_case`` at the
    current epoch; it equals the Ray stream's row for the same (seed, epoch, case, repeat).
    The store opens lazily in each process, so ``DataLoader(num_workers > 0)`` works; call
    :meth:`set_epoch` before each epoch (with ``persistent_workers=False``, the default, the
    workers receive the new epoch). The last case read is kept, so consecutive repeats of a
    case (a sequential sampler) read it once.
    """

    def __init__(
        self,
        store_url: str,
        split: str | None,
        model_cfg: ModelConfig,
        sampling_cfg: SamplingConfig,
        augment_cfg: AugmentConfig,
        *,
        seed: int = 0,
        samples_per_case: int = 1,
        epoch: int = 0,
        case_ids: Sequence[str] | None = None,
    ) -> None:
        store = open_store(store_url)
        self.store_url = store_url
        self.spec = SampleSpec.for_store(store, model_cfg, sampling_cfg, augment_cfg, seed, samples_per_case)
        self.case_ids = split_case_ids(store, split, case_ids)
        self.epoch = 0
        self.set_epoch(epoch)
        self._store: Store | None = None
        self._last: tuple[str, dict[str, np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Sample the rows of ``epoch`` from now on."""
        if epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids) * self.spec.samples_per_case

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        case_id = self.case_ids[index // self.spec.samples_per_case]
        repeat = index % self.spec.samples_per_case
        if self._last is None or self._last[0] != case_id:
            if self._store is None:
                self._store = open_store(self.store_url)
            self._last = (case_id, self._store.read_case(case_id, arrays=self.spec.arrays))
        return sample_case_rows(self._last[1], case_id, self.epoch, self.spec, repeats=(repeat,))[0]

    def __getstate__(self) -> dict[str, Any]:
        # Workers re-open the store by URL; arrays never travel with the dataset.
        state = dict(self.__dict__)
        state["_store"] = None
        state["_last"] = None
        return state


# --------------------------------------------------------------------------- Ray path


class _EpochCounter:
    """Actor body of :class:`EpochClock`: the last epoch set by each rank."""

    def __init__(self, epoch: int, world_size: int) -> None:
        self._epochs = [epoch] * world_size

    def set(self, epoch: int, rank: int) -> None:
        self._epochs[rank] = epoch

    def get(self) -> int:
        return min(self._epochs)


class EpochClock:
    """The epoch that sampling tasks of a long-lived training dataset read when they run.

    Picklable (it holds an actor handle): pass it to the training loop through its config.
    ``world_size`` must equal the Train worker count (a fixed ``ScalingConfig.num_workers``);
    every rank sets it before each epoch. See the module docstring for why it reports the
    minimum over ranks. The actor lives as long as the driver that created it.
    """

    def __init__(self, handle: ActorHandle, world_size: int) -> None:
        self._handle = handle
        self.world_size = world_size

    @classmethod
    def create(cls, epoch: int = 0, world_size: int = 1) -> EpochClock:
        """Start the clock's actor (zero CPUs, so it never blocks a small cluster)."""
        import ray

        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        if epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {epoch}")
        handle = ray.remote(num_cpus=0)(_EpochCounter).remote(epoch, world_size)
        return cls(handle, world_size)

    def set(self, epoch: int, rank: int = 0) -> None:
        """Record that ``rank`` is about to iterate ``epoch`` (blocks until recorded)."""
        import ray

        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {rank}")
        if epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {epoch}")
        ray.get(self._handle.set.remote(int(epoch), int(rank)))

    def get(self) -> int:
        """The epoch every rank has reached (minimum over ranks)."""
        import ray

        return int(ray.get(self._handle.get.remote()))


def _sample_batch(
    batch: dict[str, np.ndarray], *, store_url: str, spec: SampleSpec, epoch: int | EpochClock, row_fn: RowFn
) -> dict[str, np.ndarray]:
    """``map_batches`` body: read each case of the batch once, sample its rows, stack them."""
    store = cached_store(store_url)
    current = epoch.get() if isinstance(epoch, EpochClock) else int(epoch)
    rows: list[dict[str, np.ndarray]] = []
    for case_id in batch["case_id"]:
        case_id = str(case_id)
        arrays = store.read_case(case_id, arrays=spec.arrays)
        rows.extend(row_fn(arrays, case_id, current, spec))
        del arrays  # release the full-resolution case before the next read
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def ingest_options(
    object_store_memory: float | None = 1 << 30, cpus: float | None = None, preserve_order: bool = False
) -> ExecutionOptions:
    """Execution options that bound a training dataset's object-store use and CPUs.

    Pass them to Train V2 as ``DataConfig(execution_options={"train": ingest_options(...)})``
    (Train replaces a dataset's own options); :func:`build_training_dataset` applies them too.

    Args:
        object_store_memory: bytes of object store the stream may hold (None: Ray's default,
            a fraction of the store). Allow at least a few rows (about 111 MB each at BraTS size).
        cpus: logical CPUs the sampling tasks may use together (None: all).
        preserve_order: yield rows in case order (slower; for tests and debugging).
    """
    from ray.data import ExecutionOptions, ExecutionResources

    return ExecutionOptions(
        resource_limits=ExecutionResources(cpu=cpus, object_store_memory=object_store_memory),
        preserve_order=preserve_order,
    )


def build_training_dataset(
    store_url: str,
    split: str | None,
    model_cfg: ModelConfig,
    sampling_cfg: SamplingConfig,
    augment_cfg: AugmentConfig,
    epoch: int | EpochClock = 0,
    seed: int = 0,
    samples_per_case: int = 1,
    *,
    case_ids: Sequence[str] | None = None,
    num_cpus: float = 1.0,
    max_tasks: int | None = None,
    options: ExecutionOptions | None = None,
    row_fn: RowFn | None = None,
) -> ray.data.Dataset:
    """A streaming Ray dataset of training rows over the store's complete cases.

    One task per case reads it inside the task (never on the driver), draws
    ``samples_per_case`` rows and yields them; only complete cases are listed, so a partial
    case is never read. Rows equal :class:`CaseSampleDataset`'s for the same arguments.

    Args:
        store_url: the store's URL or path (opened by every task).
        split: "train", "val" or None (all cases).
        model_cfg, sampling_cfg, augment_cfg: what to sample.
        epoch: a fixed epoch, or an :class:`EpochClock` read when each task runs.
        seed: base seed of the run.
        samples_per_case: rows per case read per epoch.
        case_ids: restrict to these cases (all of them must be complete in the split).
        num_cpus: logical CPUs reserved per sampling task.
        max_tasks: cap on concurrent sampling tasks (None: as many as the CPUs allow).
        options: execution options for the dataset (default :func:`ingest_options`()).
        row_fn: per-case row function with :func:`sample_case_rows`'s signature (the default);
            an extension point, e.g. for rows that leave patch extraction to the trainer.

    Returns:
        A dataset with the ``ROW_KEYS`` columns, ``len(cases) * samples_per_case`` rows.
    """
    import ray.data
    from ray.data import TaskPoolStrategy

    store = open_store(store_url)
    spec = SampleSpec.for_store(store, model_cfg, sampling_cfg, augment_cfg, seed, samples_per_case)
    ids = split_case_ids(store, split, case_ids)
    log.info("training dataset: %d cases x %d samples from %s (split %s)", len(ids), samples_per_case, store_url, split)
    items = ray.data.from_items([{"case_id": c} for c in ids], override_num_blocks=len(ids))
    ds = items.map_batches(
        _sample_batch,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"store_url": store_url, "spec": spec, "epoch": epoch, "row_fn": row_fn or sample_case_rows},
        compute=TaskPoolStrategy(size=max_tasks),
        num_cpus=num_cpus,
        # Reserve what a task holds, so Ray never packs more cases onto a node than fit.
        memory=spec.task_memory_bytes(),
    )
    ds.context.execution_options = options if options is not None else ingest_options()
    return ds


__all__ = [
    "CaseSampleDataset",
    "EpochClock",
    "ROW_KEYS",
    "SampleSpec",
    "build_training_dataset",
    "cached_store",
    "case_key",
    "collate_rows",
    "ingest_options",
    "load_validation_case",
    "sample_case_rows",
    "sample_rng",
    "split_case_ids",
]
