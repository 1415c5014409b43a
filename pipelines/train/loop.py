"""The per-worker training loop that Ray Train runs on every rank (a thin shell over ossnet).

Per epoch ``e`` (1-based), every rank:

1. sets the data :class:`~ossnet_pipelines.data.EpochClock` to ``e`` and trains on its dataset shard
   with ``ossnet.training.train_epoch`` (DDP synchronises the gradients);
2. steps the LR schedule, gathers the epoch's metrics from all ranks;
3. on validation epochs scores its share of the validation cases and gathers the scores;
4. rank 0 logs the metrics (step = epoch) and the slice overlays to MLflow;
5. on checkpoint epochs rank 0 writes the checkpoint (``ossnet_pipelines.train.state``) and every rank
   calls ``ray.train.report(metrics, checkpoint=...)`` (rank 0 attaches it); other epochs report
   metrics only, so Ray Tune schedulers see every epoch.

A restarted or re-run job resumes from ``ray.train.get_checkpoint()`` (local mode: from
ossnet's own checkpoint folder) at the next epoch. The
MLflow run is resumed by its key and skips (metric, epoch) pairs it already holds, so an epoch
repeated after a crash appears once.

Epoch hooks (``train(..., epoch_hooks=...)``): callables run on every worker with an
``EpochEnd`` after an epoch is logged and before it is checkpointed, e.g. to export metrics or,
in the fault-tolerance tests, to kill a worker at the worst moment. They travel to the workers
pickled (cloudpickle), so closures work.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch

from ossnet.config import AugmentConfig
from ossnet.inference import Inferer
from ossnet.model import build_model
from ossnet.training import make_optimizer, make_scheduler, train_epoch
from ossnet_pipelines.progress import log_every
from ossnet_pipelines.train.job import StoreFacts, TrainJob
from ossnet_pipelines.train.state import LocalCheckpoints, checkpoint_dir_name, restore_first_good, write_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch hook is told: the epoch just logged (1-based), the worker's rank, the run folder."""

    epoch: int
    rank: int
    run_dir: Path


EpochHook = Callable[[EpochEnd], None]


class _TimedBatches:
    """Iterates batches and accumulates the seconds spent waiting for each one."""

    def __init__(self, batches: Iterable[Mapping[str, Any]]) -> None:
        self._it = iter(batches)
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return self

    def __next__(self) -> Mapping[str, Any]:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_s += time.perf_counter() - start


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` from every rank (a list of one without a process group)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _reduce_train(parts: list[dict[str, float]], n_points: int) -> dict[str, float]:
    """Epoch metrics over ranks: volume-weighted means, summed volumes, slowest rank's time."""
    volumes = sum(p["n_volumes"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    keys = [k for k in parts[0] if k not in ("n_volumes", "n_batches", "seconds", "wait_s")]
    out = {f"train_{k}": sum(p[k] * p["n_volumes"] for p in parts) / volumes for k in keys}
    out.update(
        train_volumes=float(volumes),
        epoch_seconds=seconds,
        data_wait_fraction=sum(p["wait_s"] / max(p["seconds"], 1e-9) for p in parts) / len(parts),
        volumes_per_s=volumes / max(seconds, 1e-9),
        points_per_s=volumes * n_points / max(seconds, 1e-9),
    )
    return out


class _RayInfoToFiles(logging.Filter):
    """Drops INFO records of Ray's own modules from a console handler (Ray Train logs some under
    their file path, which its log-level setting does not reach); Ray's files keep them."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self._ray_dir = os.path.dirname(ray.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._ray_dir)


def _setup_logging(quiet: bool = False) -> None:
    # Ray worker processes start without handlers; make epoch progress visible in job logs.
    root = logging.getLogger()
    pipelines_logger = logging.getLogger("ossnet_pipelines")
    if not root.handlers and not pipelines_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pipelines_logger.addHandler(handler)
    pipelines_logger.setLevel(logging.INFO)
    if quiet:
        for handler in root.handlers:
            if not any(isinstance(f, _RayInfoToFiles) for f in handler.filters) and \
                    not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                handler.addFilter(_RayInfoToFiles())


class _RaySession:
    """Ray Train's worker API: rank, restored checkpoint, dataset shard, report."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def shard(self) -> Any:
        import ray.train

        return ray.train.get_dataset_shard("train")

    def report(self, metrics: dict[str, float], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)


class _LocalSession:
    """Local mode (no workers): one rank, ossnet keeps the checkpoints, and reports go to the
    driver's callbacks directly.

    Ray Train's local mode runs no callbacks, and inside a Tune trial Ray refuses the
    ``ray.train`` worker API, so the loop talks to neither: this is how a local-mode Tune
    trial still reaches Tune and ASHA (through ``TuneReportCallback.after_report``).
    """

    rank, world = 0, 1

    def __init__(self, dataset: Any, callbacks: Iterable[Any]) -> None:
        self._dataset = dataset
        self._callbacks = list(callbacks)

    def checkpoint(self) -> Any:
        return None  # resumed from the local checkpoints instead

    def shard(self) -> Any:
        return self._dataset

    def report(self, metrics: dict[str, float], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        for callback in self._callbacks:
            callback.after_report(run_context=None, metrics=[dict(metrics)], checkpoint=checkpoint)


Session = Union[_RaySession, _LocalSession]


def _older_checkpoints(latest: Any) -> list[Any]:
    """Ray's latest checkpoint, then the run's other checkpoints on the same storage, newest first
    (the fallbacks when the latest is damaged)."""
    import posixpath

    import pyarrow.fs
    import ray.train

    try:
        parent = posixpath.dirname(latest.path.rstrip("/"))
        infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except Exception as exc:  # an unlistable storage only loses the fallbacks
        logger.debug("cannot list the checkpoints next to %s: %s", latest.path, exc)
        return [latest]
    name = posixpath.basename(latest.path.rstrip("/"))
    older = sorted((info.path for info in infos if info.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(info.path).startswith("checkpoint_epoch_")
                    and posixpath.basename(info.path) < name), reverse=True)
    return [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in older)]


def _device(job: TrainJob, local_mode: bool) -> torch.device:
    if local_mode:
        return torch.device("cuda" if job.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    return device[0] if isinstance(device, list) else device


def _run_epoch_hooks(config: Mapping[str, Any], epoch: int, rank: int) -> None:
    for hook in config.get("epoch_hooks") or ():
        hook(EpochEnd(epoch=epoch, rank=rank, run_dir=Path(config["run_dir"])))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train loop. ``config`` comes from the driver (``ossnet_pipelines.train.driver``).

    Keys: ``job`` (a resolved TrainJob), ``facts`` (StoreFacts), ``clock`` (EpochClock),
    ``tracking_uri`` (None: no MLflow), ``parent_run_id``, ``local_mode``, ``run_dir``,
    ``preprocess`` (PreprocessSpec), ``epoch_hooks``; in local mode also
    ``local_dataset`` (the training dataset) and ``local_callbacks`` (``ray.train.UserCallback``
    objects whose ``after_report`` the loop calls after each epoch).

    Returns:
        On every rank: ``{"start_epoch", "executed_epochs", "history", "world_size"}`` (Ray keeps
        rank 0's).
    """
    _setup_logging(quiet=bool(config.get("quiet")))
    job: TrainJob = config["job"]
    facts: StoreFacts = config["facts"]
    local_mode = bool(config["local_mode"])
    session: Session = (_LocalSession(config["local_dataset"], config.get("local_callbacks") or ())
                        if local_mode else _RaySession())
    rank, world = session.rank, session.world
    if job.scaling.worker_resources()["CPU"] <= 1:
        torch.set_num_threads(1)  # one logical CPU: extra threads only contend with data tasks

    device = _device(job, local_mode)
    torch.manual_seed(job.train.seed)  # same initial weights on every rank
    bare = build_model(facts.model).to(device)
    model: torch.nn.Module = bare
    if not local_mode:
        import ray.train.torch

        model = ray.train.torch.prepare_model(bare)
        bare = getattr(model, "module", model)
    optimizer = make_optimizer(bare, job.train.optimizer, job.train.lr)
    scheduler = make_scheduler(optimizer, job.train.milestones, job.train.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=job.train.mixed_precision and device.type == "cuda")

    local = LocalCheckpoints(Path(config["run_dir"]) / "local", job.train.keep_checkpoints) if local_mode else None
    checkpoint = session.checkpoint()
    candidates = _older_checkpoints(checkpoint) if checkpoint is not None else (
        local.newest_first() if local is not None else [])
    restored = restore_first_good(candidates, bare, optimizer, scheduler, scaler)
    start_epoch = restored.epoch + 1 if restored is not None else 1
    earlier = [m for m in (restored.history if restored is not None else []) if m.get("epoch", 0) < start_epoch]
    if start_epoch > 1:
        logger.info("rank %d: resuming %s after epoch %d", rank, job.run_name, start_epoch - 1)

    run_logger = None
    if rank == 0 and config.get("tracking_uri"):
        from ossnet_pipelines.tracking import RunLogger
        from ossnet_pipelines.tracking.outage import OutageTolerantRun, fail_fast_on_lost_server

        fail_fast_on_lost_server()
        run_logger = OutageTolerantRun(RunLogger(job.run_name, job.tracking.experiment, config["tracking_uri"],
                                                 parent_run_id=config.get("parent_run_id"),
                                                 log_system_metrics=job.tracking.system_metrics and not local_mode))
        run_logger.start()

    from ossnet_pipelines.data import SampleSpec
    from ossnet_pipelines.store import open_store
    from ossnet_pipelines.train.validation import COLLAPSE_TAG, Validator, collapse_message, summarize

    png_dir = Path(tempfile.mkdtemp(prefix="ossnet-val-")) if rank == 0 and job.validation.png_cases else None
    validator = Validator(
        store_url=job.store,
        case_ids=facts.val_cases[rank::world],
        spec=SampleSpec.for_store(
            open_store(job.store), facts.model,
            replace(job.sampling, n_points=job.validation.n_points or job.sampling.n_points),
            AugmentConfig.off(), job.train.seed, 1,
        ),
        inferer=Inferer(mode=job.validation.mode, chunk_points=job.validation.chunk_points, device=str(device)),
        alpha=job.train.alpha,
        png_cases=job.validation.png_cases if rank == 0 else 0,
        png_dir=png_dir,
        objective=job.validation.objective,
        weights=job.train.target_weights,
    )
    shard = session.shard()
    clock = config["clock"]
    history: list[dict[str, float]] = []
    try:
        for epoch in range(start_epoch, job.train.epochs + 1):
            clock.set(epoch, rank=rank)
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            batches = _TimedBatches(shard.iter_torch_batches(
                batch_size=job.per_worker_batch, prefetch_batches=job.data.prefetch_batches, drop_last=False,
            ))
            stats = train_epoch(model, batches, optimizer, job.train.alpha, device, scaler, job.train.target_weights)
            stats.update(seconds=time.perf_counter() - start, wait_s=batches.wait_s)
            scheduler.step()
            metrics: dict[str, float] = {"epoch": float(epoch), "lr": lr}
            metrics.update(_reduce_train(_gather(stats, world), job.sampling.n_points))

            pngs: list[Path] = []
            collapse = None
            if job.train.is_validation_epoch(epoch):
                scores, pngs = validator(bare, epoch)
                all_scores = [s for part in _gather(scores, world) for s in part]
                metrics.update(summarize(all_scores))
                collapse = collapse_message(all_scores)
            # About ten epoch lines per run, every validation epoch among them; -v shows them all.
            shown = epoch in (start_epoch, job.train.epochs) or job.train.is_validation_epoch(epoch) \
                or epoch % log_every(job.train.epochs) == 0
            logger.log(logging.INFO if shown else logging.DEBUG, "epoch %d/%d: %s", epoch, job.train.epochs,
                       "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if collapse is not None and rank == 0:
                logger.warning("epoch %d: validation predicts almost no foreground: %s. Early in training "
                               "the model may still be learning; if this persists or follows better epochs, "
                               "training has collapsed (README: 'When training collapses').", epoch, collapse)
            if run_logger is not None:
                if collapse is not None:
                    run_logger.set_tags({COLLAPSE_TAG: f"epoch {epoch}: {collapse}"})
                run_logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                for png in pngs:
                    run_logger.log_figure(png, f"validation/{png.parent.name}/{png.name}")
            _run_epoch_hooks(config, epoch, rank)

            history.append(metrics)
            if job.train.is_checkpoint_epoch(epoch):
                _report_checkpoint(session, config, metrics, epoch, bare, optimizer, scheduler, scaler, local,
                                   [*earlier, *history])
            else:
                session.report(metrics)
    finally:
        if png_dir is not None:  # the PNGs are in MLflow by now
            shutil.rmtree(png_dir, ignore_errors=True)
    return {"start_epoch": start_epoch, "executed_epochs": [int(m["epoch"]) for m in history], "history": history,
            "world_size": world}


def _report_checkpoint(
    session: Session, config: Mapping[str, Any], metrics: dict[str, float], epoch: int, model: torch.nn.Module,
    optimizer: Any, scheduler: Any, scaler: Any, local: LocalCheckpoints | None, history: list[dict[str, float]],
) -> None:
    """Rank 0 writes the checkpoint (with every epoch's metrics so far); every rank reports (Ray
    persists rank 0's directory)."""
    from ray.train import Checkpoint

    job: TrainJob = config["job"]
    name = checkpoint_dir_name(epoch)
    if session.rank != 0:
        session.report(metrics, None, name)
        return
    args = dict(epoch=epoch, seed=job.train.seed, metrics=metrics, preprocess=config["preprocess"], run_name=job.run_name,
                history=history)
    if local is not None:  # local mode: Ray keeps nothing, ossnet keeps the directories
        path = write_checkpoint(local.path_for(epoch), model, optimizer, scheduler, scaler, **args)
        session.report(metrics, Checkpoint.from_directory(str(path)), name)
        local.prune()
        return
    with tempfile.TemporaryDirectory(prefix="ossnet-ckpt-") as tmp:
        write_checkpoint(tmp, model, optimizer, scheduler, scaler, **args)
        session.report(metrics, Checkpoint.from_directory(tmp), name)


__all__ = ["EpochEnd", "EpochHook", "train_loop_per_worker"]
