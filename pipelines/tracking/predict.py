"""Predict a volume of any size with a model that works on a fixed grid (no MLflow here).

The model sees ``model.config.volume_shape``. The input goes through the case geometry that
batch inference uses (``ossnet_pipelines.volumes``, ``ossnet.geometry``): z-scored per the checkpoint's
spec (unless already normalised), reoriented to RAS from its affine, resampled as the model's
training store was (``resample``) and centred on the grid; the ``Inferer`` runs there, and the
probability map goes back through the exact inverse (linear resampling; voxels cropped away
get probability 0), then the threshold gives the mask. The pyfunc bundle and ``ossnet infer``
therefore give identical masks for the same scan and affine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumePrediction:
    """Prediction at the input's size.

    Attributes:
        probability: (X, Y, Z) float32 in [0, 1]; (T, X, Y, Z) for a model of T targets.
        mask: (X, Y, Z) uint8 {0, 1} (``probability >= threshold``); for T targets the label map
            in the source's values (``ossnet.targets.TargetSpec.label_map`` of the T regions).
        n_queries: points decoded by the model.
        seconds: inference wall time.
        mode: the inference mode that ran.
    """

    probability: np.ndarray
    mask: np.ndarray
    n_queries: int
    seconds: float
    mode: str


def default_mode(model: nn.Module) -> str:
    """``"mise_lowres"`` for models with a low-resolution head (C, D), else ``"mise"``."""
    return "mise_lowres" if model.config.has_lowres_head else "mise"


def make_inferer(model: nn.Module, *, mode: str | None = None, device: str = "cpu",
                 chunk_points: int = 2**14, threshold: float = 0.5, recall_margin: float | None = None) -> Any:
    """An ``ossnet.inference.Inferer`` with the model's default mode unless ``mode`` is given
    (``recall_margin`` None: the library default)."""
    from ossnet.inference import Inferer

    extra = {} if recall_margin is None else {"recall_margin": float(recall_margin)}
    return Inferer(mode=mode or default_mode(model), device=device, chunk_points=chunk_points,
                   threshold=threshold, seed_threshold=min(0.3, threshold), **extra)


def zscore_mask_of(preprocess: Any) -> str | None:
    """The z-score mask mode a checkpoint's preprocessing spec asks for, or None for no z-score.

    Reads ``normalization`` (``"zscore"``/``"zscore_nonzero"``/``"zscore_all"``/``"none"``) and an
    optional ``zscore_mask`` attribute; a missing spec means the default ``"nonzero"`` z-score.
    """
    if preprocess is None:
        return "nonzero"
    norm = str(getattr(preprocess, "normalization", "zscore")).lower()
    if norm in ("none", "", "identity"):
        return None
    if norm.startswith("zscore_"):
        return norm.split("_", 1)[1]
    return str(getattr(preprocess, "zscore_mask", "nonzero"))


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    inferer: Any | None = None,
    *,
    preprocess: Any = None,
    normalized: bool = False,
    affine: Any = None,
) -> VolumePrediction:
    """Segment a ``(C, X, Y, Z)`` volume of any spatial size with a fixed-grid model.

    Args:
        model: an ``OSSNet`` on the inferer's device.
        image: (C, X, Y, Z) intensities (raw unless ``normalized``); (X, Y, Z) is accepted for
            single-channel models.
        inferer: an ``Inferer``; default ``make_inferer(model)`` at the spec's threshold.
        preprocess: the checkpoint's preprocessing spec (z-score, resampling).
        normalized: the image is already normalised; skip the z-score.
        affine: the scan's voxel -> world affine (4x4); default identity (a RAS scan with 1 mm
            voxels). Without it, a non-RAS scan is not reoriented as batch inference would.

    Returns:
        A ``VolumePrediction`` on the input's (X, Y, Z) grid.

    Raises:
        ValueError: wrong channel count or dimensionality, non-finite voxels, a bad affine.
    """
    import dask.array as da

    from ossnet_pipelines import volumes

    cfg = model.config
    arr = np.asarray(image)
    if arr.ndim == 3 and cfg.encoder.in_channels == 1:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"image: expected (C, X, Y, Z), got shape {arr.shape}")
    if arr.shape[0] != cfg.encoder.in_channels:
        raise ValueError(f"image: model expects {cfg.encoder.in_channels} channels, got {arr.shape[0]} (shape {arr.shape})")
    if any(s < 2 for s in arr.shape[1:]):
        raise ValueError(f"image: every spatial size must be >= 2, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"image: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    mask_mode = None if normalized else zscore_mask_of(preprocess)
    record = volumes.case_record(arr.shape[1:], affine, cfg.volume_shape, mask_mode or "all",
                                 str(getattr(preprocess, "resample", "none")),
                                 getattr(preprocess, "target_spacing", None), name="image")
    channels = [(da.from_array(arr[c], chunks=(-1, -1, 32)), f"image channel {c}") for c in range(arr.shape[0])]
    with volumes.compute_options("threads", 1):
        if mask_mode is None:
            from ossnet.preprocess import validate_finite

            validate_finite(arr, "image")
            grid = np.stack([np.asarray(record.to_grid(arr[c], order=1, dtype=np.float32)) for c in range(len(arr))])
        else:
            lazy, record = volumes.image_grid(channels, record)
            grid = np.ascontiguousarray(lazy.compute(), dtype=np.float32)
        if inferer is None:
            inferer = make_inferer(model, threshold=float(getattr(preprocess, "threshold", 0.5)))
        result = inferer(model, grid)
        grid_probability = np.asarray(result.probability, dtype=np.float32)
        maps = grid_probability if grid_probability.ndim == 4 else grid_probability[None]
        probability = np.stack([np.asarray(volumes.scan_view(p, record, order=1).compute()) for p in maps])
        regions = probability >= np.float32(inferer.threshold)  # scan_mask, from the computed maps
        if grid_probability.ndim == 4:
            mask = cfg.targets.label_map(regions)
        else:
            probability, mask = np.ascontiguousarray(probability[0]), regions[0].astype(np.uint8)
    logger.debug("predicted %s volume on grid %s: %d queries", tuple(arr.shape[1:]), cfg.volume_shape, result.n_queries)
    return VolumePrediction(probability=probability, mask=mask, n_queries=int(result.n_queries),
                            seconds=float(result.seconds), mode=str(result.mode))


__all__ = ["VolumePrediction", "default_mode", "make_inferer", "predict_volume", "zscore_mask_of"]
