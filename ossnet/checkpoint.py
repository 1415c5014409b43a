"""Self-describing checkpoints: weights + ``ModelConfig`` + preprocessing spec + versions.

A checkpoint is one ``torch.save`` file holding only plain containers and tensors, so it loads
with ``torch.load(weights_only=True)`` (no code runs at load time)::

    {"format": "ossnet-checkpoint", "format_version": 1,
     "model_config": config_to_dict(ModelConfig), "state_dict": {name: tensor},
     "preprocess": PreprocessSpec.to_dict(), "versions": {"torch", "ossnet", "python"},
     "extra": {... JSON-compatible ...}}

``load_model(path)`` needs nothing else (nanoGPT's checkpoints carry their model args; nnU-Net's
predictor needs only its output folder). The same file is what gets logged to MLflow.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping, Union, cast

import torch
from torch import nn

import ossnet
from ossnet.config import ConfigError, ModelConfig, config_to_dict, model_config_from_dict
from ossnet.geometry import RESAMPLE_MODES, ZSCORE_MASKS
from ossnet.model import OSSNet, build_model

logger = logging.getLogger(__name__)

FORMAT_TAG = "ossnet-checkpoint"
FORMAT_VERSION = 1
NORMALIZATIONS: tuple[str, ...] = ("zscore",)
ORIENTATIONS: tuple[str, ...] = ("RAS",)

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, foreign, of another format version or inconsistent.

    The message starts with the file name.
    """


@dataclass(frozen=True)
class PreprocessSpec:
    """How an input volume must be prepared for the model (and how to read its output).

    Attributes:
        modalities: channel names in model order, e.g. ``("flair", "t1", "t1ce", "t2")``.
        volume_shape: the model grid ``(X, Y, Z)`` volumes are cropped/padded to.
        normalization: intensity normalisation per channel ("zscore").
        zscore_mask: voxels the z-score statistics are taken over ("nonzero" or "all").
        orientation: axis orientation of the model grid ("RAS").
        label_map: how source labels became the binary target, e.g. "nonzero" (label > 0).
        threshold: foreground decision threshold on the output probability.
        resample: how scans reach the grid: "none", "resize" or "spacing" (``ossnet.geometry``);
            inference applies the same as the training store did.
        target_spacing: the spacing in mm for ``resample="spacing"``.
    """

    modalities: tuple[str, ...]
    volume_shape: tuple[int, int, int]
    normalization: str = "zscore"
    zscore_mask: str = "nonzero"
    orientation: str = "RAS"
    label_map: str = "nonzero"
    threshold: float = 0.5
    resample: str = "none"
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(str(m) for m in self.modalities))
        object.__setattr__(self, "volume_shape", tuple(int(s) for s in self.volume_shape))
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"preprocess.modalities: need distinct channel names, got {self.modalities}")
        if len(self.volume_shape) != 3 or any(s < 2 for s in self.volume_shape):
            raise ValueError(f"preprocess.volume_shape: need three sizes >= 2, got {self.volume_shape}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"preprocess.normalization: {self.normalization!r} not in {NORMALIZATIONS}")
        if self.zscore_mask not in ZSCORE_MASKS:
            raise ValueError(f"preprocess.zscore_mask: {self.zscore_mask!r} not in {ZSCORE_MASKS}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"preprocess.orientation: {self.orientation!r} not in {ORIENTATIONS}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"preprocess.threshold: must be in (0, 1), got {self.threshold}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"preprocess.resample: {self.resample!r} not in {RESAMPLE_MODES}")
        if self.target_spacing is not None:
            object.__setattr__(self, "target_spacing", tuple(float(v) for v in self.target_spacing))
        if self.resample == "spacing" and (self.target_spacing is None or len(self.target_spacing) != 3):
            raise ValueError(f"preprocess.target_spacing: resample 'spacing' needs three spacings, got {self.target_spacing}")

    @classmethod
    def for_model(cls, config: ModelConfig, modalities: tuple[str, ...], **kwargs: Any) -> "PreprocessSpec":
        """The spec for a model: its grid, the given channel names, other fields as given."""
        return cls(modalities=tuple(modalities), volume_shape=config.volume_shape, **kwargs)

    def check_model(self, config: ModelConfig) -> None:
        """Raise ``ValueError`` if the spec does not fit the model (channels, grid)."""
        if len(self.modalities) != config.encoder.in_channels:
            raise ValueError(
                f"preprocess.modalities: {len(self.modalities)} channels but the model takes {config.encoder.in_channels}"
            )
        if tuple(self.volume_shape) != tuple(config.volume_shape):
            raise ValueError(f"preprocess.volume_shape: {self.volume_shape} != model grid {tuple(config.volume_shape)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {
            "modalities": list(self.modalities),
            "volume_shape": list(self.volume_shape),
            "normalization": self.normalization,
            "zscore_mask": self.zscore_mask,
            "orientation": self.orientation,
            "label_map": self.label_map,
            "threshold": float(self.threshold),
            "resample": self.resample,
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        """Inverse of ``to_dict``; raises ``ValueError`` naming the bad field."""
        known = {"modalities", "volume_shape", "normalization", "zscore_mask", "orientation", "label_map", "threshold",
                 "resample", "target_spacing"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"preprocess: unknown field(s) {sorted(unknown)}")
        for key in ("modalities", "volume_shape"):
            if key not in data:
                raise ValueError(f"preprocess.{key}: missing")
        try:
            return cls(**{k: v for k, v in data.items()})
        except TypeError as exc:
            raise ValueError(f"preprocess: malformed ({exc})") from exc


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything a checkpoint says about itself besides the weights.

    Attributes:
        source: the file name (or a description of the file object) it was read from.
        config: the model configuration.
        preprocess: the preprocessing spec.
        versions: library versions at save time ("torch", "ossnet", "python").
        extra: caller-supplied JSON-compatible metadata (epoch, metrics, run id, ...).
        format_version: checkpoint format version.
    """

    source: str
    config: ModelConfig
    preprocess: PreprocessSpec
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


Checkpoint = CheckpointInfo  # the name used in INTERFACES.md


def _bare(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP/DataParallel wrapper or a ``torch.compile`` result."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def checkpoint_payload(model: nn.Module, preprocess: PreprocessSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict ``save_checkpoint`` writes (weights copied to the CPU).

    Raises:
        ValueError: the spec does not fit the model, or ``extra`` is not JSON-compatible.
    """
    bare = _bare(model)
    config = cast(ModelConfig, bare.config)
    preprocess.check_model(config)
    extra_dict = dict(extra or {})
    try:
        # Round trip through JSON: only plain types survive, as weights_only loading requires.
        extra_dict = json.loads(json.dumps(extra_dict))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra: must be JSON-compatible ({exc})") from exc
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "model_config": config_to_dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "preprocess": preprocess.to_dict(),
        "versions": {"torch": str(torch.__version__), "ossnet": str(ossnet.__version__), "python": platform.python_version()},
        "extra": extra_dict,
    }


def save_checkpoint(
    path: PathLike, model: nn.Module, preprocess: PreprocessSpec, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write a self-describing checkpoint atomically (temporary file in the same folder + rename).

    Args:
        path: destination file; parent folders are created.
        model: an ``OSSNet`` (possibly wrapped by DDP or ``torch.compile``).
        preprocess: the preprocessing the model was trained with.
        extra: JSON-compatible metadata stored alongside.

    Returns:
        The destination path.
    """
    payload = checkpoint_payload(model, preprocess, extra)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("saved checkpoint %s (variant %s)", dest, payload["model_config"]["variant"])
    return dest


def _source_name(source: PathLike | IO[bytes]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", f"<{type(source).__name__}>"))


def _read(source: PathLike | IO[bytes], name: str) -> Any:
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise CheckpointError(f"{name}: no such checkpoint file")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{name}: holds objects other than tensors and plain containers; not an ossnet checkpoint"
            ) from exc
        raise CheckpointError(f"{name}: unreadable checkpoint (corrupt?): {exc}") from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/zipfile errors for bad bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{name}: unreadable checkpoint (truncated or corrupt?): {first}") from exc


def load_checkpoint(
    source: PathLike | IO[bytes], map_location: str | torch.device = "cpu"
) -> tuple[OSSNet, CheckpointInfo]:
    """Rebuild the model from a checkpoint written by ``save_checkpoint``.

    Args:
        source: a file path or a binary file object (e.g. ``io.BytesIO``).
        map_location: device the returned model is placed on.

    Returns:
        ``(model in eval mode, CheckpointInfo)``.

    Raises:
        CheckpointError: missing, truncated/corrupt or foreign file, unsupported format version,
            or a model config that does not match the weights.
    """
    name = _source_name(source)
    data = _read(source, name)
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        bare = isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values())
        hint = " (a bare state_dict?)" if bare else ""
        raise CheckpointError(f"{name}: not an ossnet checkpoint: no '{FORMAT_TAG}' format tag{hint}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{name}: checkpoint format version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("model_config", "state_dict", "preprocess"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{name}: missing or malformed '{key}'")
    try:
        config = model_config_from_dict(data["model_config"])
        preprocess = PreprocessSpec.from_dict(data["preprocess"])
        preprocess.check_model(config)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    model = build_model(config)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"{name}: model config does not match the weights: {detail}") from exc
    model.to(map_location).eval()
    info = CheckpointInfo(
        source=name,
        config=config,
        preprocess=preprocess,
        versions={str(k): str(v) for k, v in dict(data.get("versions") or {}).items()},
        extra=dict(data.get("extra") or {}),
        format_version=int(version),
    )
    return model, info


def load_model(source: PathLike | IO[bytes], map_location: str | torch.device = "cpu") -> OSSNet:
    """The model of a checkpoint, in eval mode on ``map_location``."""
    return load_checkpoint(source, map_location)[0]


def checkpoint_bytes(model: nn.Module, preprocess: PreprocessSpec, extra: Mapping[str, Any] | None = None) -> bytes:
    """The checkpoint file's bytes (for stores that take bytes, e.g. artifact uploads)."""
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(model, preprocess, extra), buffer)
    return buffer.getvalue()


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "PreprocessSpec",
    "checkpoint_bytes",
    "checkpoint_payload",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
