"""Training checkpoints: a directory Ray Train persists, resumable at epoch granularity.

Layout of one checkpoint directory::

    model.pt         the library's self-describing checkpoint (ossnet.checkpoint): weights,
                     ModelConfig, PreprocessSpec, versions; extra = {epoch, metrics, run}.
                     This file alone is what gets logged to MLflow as the model bundle.
    train_state.pt   optimiser (incl. Lookahead slow weights), LR scheduler, GradScaler,
                     epoch, seed and the torch RNG states (CPU and CUDA).
    metrics.json     the metrics reported with the checkpoint (for people and tools).
    history.json     every epoch's metrics up to this one, across restarts: what reconciles
                     MLflow after a tracking-server outage.

Both ``.pt`` files load with ``torch.load(weights_only=True)``. Data sampling is seeded by
(seed, epoch, case, repeat), so restoring this state and re-running epoch ``e + 1`` reproduces
an uninterrupted run at epoch granularity.

In Ray Train's local mode (``num_workers: 0``) nothing is persisted by Ray, so
:class:`LocalCheckpoints` keeps the same directories under ``<storage>/<run>/local/`` with the
same retention policy (the best ``keep`` by ``val_dice`` plus the latest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ossnet.checkpoint import PreprocessSpec, load_checkpoint, save_checkpoint
from ossnet.config import config_to_dict

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
SCORE_METRIC = "val_dice"


class ResumeError(RuntimeError):
    """A checkpoint of this run name cannot continue this job (e.g. another model config)."""


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_checkpoint` brought back."""

    epoch: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    return out


def write_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    *,
    epoch: int,
    seed: int,
    metrics: Mapping[str, Any],
    preprocess: PreprocessSpec,
    run_name: str,
    history: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a training checkpoint into ``directory`` (created); returns it.

    ``history``: every epoch's metrics so far (``history.json``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clean = _jsonable(metrics)
    save_checkpoint(out / MODEL_FILE, model, preprocess, extra={"epoch": epoch, "run": run_name, "metrics": clean})
    state = {
        "epoch": int(epoch),
        "seed": int(seed),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)
    (out / METRICS_FILE).write_text(json.dumps(clean, indent=1, sort_keys=True))
    (out / HISTORY_FILE).write_text(json.dumps([_jsonable(m) for m in history]))
    return out


def restore_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> Restored:
    """Load a checkpoint written by :func:`write_checkpoint` into live training objects.

    Args:
        directory: the checkpoint directory.
        model: the bare model (not the DDP wrapper) on its device.
        optimizer, scheduler, scaler: freshly built for ``model``.

    Raises:
        ResumeError: the checkpoint's model config differs from ``model``'s.
    """
    src = Path(directory)
    loaded, info = load_checkpoint(src / MODEL_FILE, map_location="cpu")
    if config_to_dict(info.config) != config_to_dict(model.config):
        raise ResumeError(
            f"{src}: the checkpoint was trained with another model config; "
            "give this job a new run.name (or remove the old run's folder) to start afresh"
        )
    model.load_state_dict(loaded.state_dict())
    device = next(model.parameters()).device
    state = torch.load(src / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return Restored(epoch=int(state["epoch"]), metrics=read_metrics(src), history=read_history(src))


@contextlib.contextmanager
def checkpoint_directory(checkpoint: Any) -> Iterator[Path]:
    """A local directory holding a checkpoint: a path as is, or a ``ray.train.Checkpoint``
    (downloaded from remote storage if needed)."""
    if isinstance(checkpoint, (str, Path)):
        yield Path(checkpoint)
    else:
        with checkpoint.as_directory() as directory:
            yield Path(directory)


def restore_first_good(
    candidates: Iterable[Any],
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> Restored | None:
    """Restore the first checkpoint of ``candidates`` (newest first) that loads.

    A damaged checkpoint (truncated or corrupt file, missing file) or a foreign one (another
    model config) is reported in one warning line and the next, older one is tried: training
    resumes from the previous good checkpoint and repeats the epochs after it.

    Args:
        candidates: checkpoint directories or ``ray.train.Checkpoint`` objects, newest first.
        model, optimizer, scheduler, scaler: as for :func:`restore_checkpoint`.

    Returns:
        What was restored, or None when there are no candidates.

    Raises:
        ResumeError: every candidate failed; the message names each and why.
    """
    failures = []
    for candidate in candidates:
        name = getattr(candidate, "path", candidate)
        try:
            with checkpoint_directory(candidate) as directory:
                restored = restore_checkpoint(directory, model, optimizer, scheduler, scaler)
        except Exception as exc:  # any checkpoint that cannot be restored is skipped, the reason kept
            reason = " ".join(str(exc).split()) or type(exc).__name__
            failures.append(f"{name}: {reason}")
            logger.warning("cannot resume from checkpoint %s (%s); trying the previous one", name, reason)
            continue
        if failures:
            logger.warning("resumed from the older checkpoint %s (epoch %d) after %d damaged or foreign one(s)",
                           name, restored.epoch, len(failures))
        return restored
    if failures:
        raise ResumeError(f"no checkpoint of this run can be restored: {'; '.join(failures)}")
    return None


def read_metrics(directory: str | Path) -> dict[str, Any]:
    """The metrics saved with a checkpoint ({} when the file is missing)."""
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_history(directory: str | Path) -> list[dict[str, Any]]:
    """Every epoch's metrics saved with a checkpoint ([] when the file is missing or unreadable)."""
    path = Path(directory) / HISTORY_FILE
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        return []
    return [dict(m) for m in history if isinstance(m, dict)]


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def _score(metrics: Mapping[str, Any]) -> float:
    value = metrics.get(SCORE_METRIC)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


class LocalCheckpoints:
    """Checkpoint directories kept by ossnet when Ray Train runs in local mode.

    Args:
        root: ``<storage_path>/<run_name>/local``.
        keep: best checkpoints kept by ``val_dice``; the latest is always kept too.
    """

    _NAME = re.compile(r"^checkpoint_epoch_(\d{4,})$")

    def __init__(self, root: str | Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    def _all(self) -> list[tuple[int, Path, dict[str, Any]]]:
        found = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = self._NAME.match(path.name)
                if match and (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
                    found.append((int(match.group(1)), path, read_metrics(path)))
        return sorted(found)

    def path_for(self, epoch: int) -> Path:
        return self.root / checkpoint_dir_name(epoch)

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1][1] if found else None

    def newest_first(self) -> list[Path]:
        """Every kept checkpoint directory, the latest epoch first."""
        return [path for _, path, _ in reversed(self._all())]

    def best(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint with the highest ``val_dice`` (the latest one on ties)."""
        found = self._all()
        if not found:
            return None
        epoch, path, metrics = max(found, key=lambda item: (_score(item[2]), item[0]))
        return path, metrics

    def prune(self) -> None:
        """Delete all but the best ``keep`` and the latest checkpoint."""
        found = self._all()
        if not found:
            return
        ranked = sorted(found, key=lambda item: (_score(item[2]), item[0]), reverse=True)
        keep = {item[1] for item in ranked[: self.keep]} | {found[-1][1]}
        for _, path, _ in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                logger.debug("removed checkpoint %s", path)


__all__ = [
    "HISTORY_FILE",
    "LocalCheckpoints",
    "METRICS_FILE",
    "MODEL_FILE",
    "ResumeError",
    "Restored",
    "SCORE_METRIC",
    "STATE_FILE",
    "checkpoint_dir_name",
    "checkpoint_directory",
    "read_history",
    "read_metrics",
    "restore_checkpoint",
    "restore_first_good",
    "write_checkpoint",
]
