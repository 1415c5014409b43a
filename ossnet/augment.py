"""Training augmentation: sample parameters first, then apply them (recordable, deterministic).

The paper's augmentations, each applied with its own probability after per-channel z-score
normalisation: a flip over a random non-empty subset of the spatial axes (image, label, border
band and points together), a brightness shift of ``max(x_c) * U(-b, b)`` per channel and
additive Gaussian noise. ``sample_augment_params`` draws everything random, including a seed
for the noise field, so ``apply_augment`` is a pure function of its arguments.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ossnet.config import AugmentConfig

logger = logging.getLogger(__name__)

_SPATIAL_AXES = (0, 1, 2)


@dataclass(frozen=True)
class AugmentParams:
    """Concrete augmentation of one volume.

    Attributes:
        flip_axes: spatial axes (0 = X, 1 = Y, 2 = Z) to reverse; empty for no flip.
        brightness: per-channel additive offset, or None for no brightness change.
        noise_sigma: standard deviation of the additive Gaussian noise (0 disables it).
        noise_seed: seed of the ``torch.Generator`` that draws the noise field (CPU).
    """

    flip_axes: tuple[int, ...] = ()
    brightness: tuple[float, ...] | None = None
    noise_sigma: float = 0.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if any(a not in _SPATIAL_AXES for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"flip_axes: need distinct spatial axes from {_SPATIAL_AXES}, got {self.flip_axes}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma: must be >= 0, got {self.noise_sigma}")

    @property
    def is_identity(self) -> bool:
        """True when applying these parameters changes nothing."""
        return not self.flip_axes and self.brightness is None and self.noise_sigma == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for logging / recording (tuples become lists)."""
        out = asdict(self)
        out["flip_axes"] = list(self.flip_axes)
        out["brightness"] = None if self.brightness is None else list(self.brightness)
        return out


def sample_augment_params(cfg: AugmentConfig, image: np.ndarray, rng: np.random.Generator) -> AugmentParams:
    """Draw one set of augmentation parameters.

    The generator is always advanced by the same number of draws whatever the outcome, so the
    stream that follows (e.g. point sampling) does not depend on the probabilities.

    Args:
        cfg: probabilities and magnitudes.
        image: (C, X, Y, Z) normalised volume; only its per-channel maxima are read.
        rng: source of randomness.

    Returns:
        The sampled ``AugmentParams``.
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (C, X, Y, Z), got {tuple(image.shape)}")
    n_channels = int(image.shape[0])
    decisions = rng.random(3)
    subset = int(rng.integers(1, 8))  # non-empty subset of 3 axes as a bit mask
    factors = rng.uniform(-cfg.brightness, cfg.brightness, size=n_channels)
    noise_seed = int(rng.integers(0, 2**63 - 1))

    flip_axes: tuple[int, ...] = ()
    if decisions[0] < cfg.p_flip:
        flip_axes = tuple(a for a in _SPATIAL_AXES if subset >> a & 1)
    brightness: tuple[float, ...] | None = None
    if decisions[1] < cfg.p_brightness and cfg.brightness > 0:
        maxima = np.asarray(image).reshape(n_channels, -1).max(axis=1).astype(np.float64)
        brightness = tuple(float(m * f) for m, f in zip(maxima, factors))
    noise_sigma = float(cfg.noise_sigma) if decisions[2] < cfg.p_noise else 0.0
    return AugmentParams(flip_axes=flip_axes, brightness=brightness, noise_sigma=noise_sigma, noise_seed=noise_seed)


def _flip_view(array: np.ndarray, axes: tuple[int, ...], offset: int) -> np.ndarray:
    """Reversed view of ``array`` along spatial ``axes`` (shifted by ``offset`` leading axes)."""
    index = [slice(None)] * array.ndim
    for a in axes:
        index[a + offset] = slice(None, None, -1)
    return array[tuple(index)]


def apply_augment(
    params: AugmentParams,
    image: np.ndarray,
    label: np.ndarray | None,
    band: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Apply ``params`` consistently to a volume, its label, border band and voxel points.

    The result is ``flip(image) + brightness + noise``; the noise field is drawn in the output
    frame from ``params.noise_seed``. A point ``p`` maps to ``shape - 1 - p`` along each flipped
    axis, so ``label_out[points_out] == label[points]``.

    Args:
        params: what to apply.
        image: (C, X, Y, Z) float volume.
        label: (X, Y, Z) label or None.
        band: (X, Y, Z) border-band mask or None.
        points: (N, 3) integer voxel indices or None.

    Returns:
        ``(image, label, band, points)``: image float32 (C, X, Y, Z) and C-contiguous (the input
        object itself when ``params`` is the identity and the input already is float32 and
        contiguous: treat outputs as read-only), the others contiguous copies or None.
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (C, X, Y, Z), got {tuple(image.shape)}")
    spatial = tuple(int(s) for s in image.shape[1:])
    for name, arr in (("label", label), ("band", band)):
        if arr is not None and tuple(arr.shape) != spatial:
            raise ValueError(f"{name}: shape {tuple(arr.shape)} does not match image spatial shape {spatial}")
    if points is not None and (points.ndim != 2 or points.shape[1] != 3):
        raise ValueError(f"points: expected shape (N, 3), got {tuple(points.shape)}")
    if params.brightness is not None and len(params.brightness) != image.shape[0]:
        raise ValueError(f"brightness: {len(params.brightness)} offsets for {image.shape[0]} channels")

    axes = params.flip_axes
    view = _flip_view(image, axes, 1)
    offset = None
    if params.brightness is not None:
        offset = np.asarray(params.brightness, dtype=np.float32).reshape(-1, 1, 1, 1)
    if params.noise_sigma > 0:
        # The noise buffer becomes the output: one allocation, brightness and image added in place.
        # torch's generator draws normals about twice as fast as numpy's for volumes this size.
        generator = torch.Generator().manual_seed(params.noise_seed)
        out = torch.randn(tuple(image.shape), generator=generator, dtype=torch.float32).numpy()
        out *= np.float32(params.noise_sigma)
        if offset is not None:
            out += offset
        np.add(out, view, out=out, casting="unsafe")
    elif offset is not None:
        out = np.add(view, offset, dtype=np.float32)
    else:
        out = np.ascontiguousarray(view, dtype=np.float32)

    label_out = None if label is None else np.ascontiguousarray(_flip_view(label, axes, 0))
    band_out = None if band is None else np.ascontiguousarray(_flip_view(band, axes, 0))
    points_out = None
    if points is not None:
        points_out = np.array(points, copy=True)
        for a in axes:
            points_out[:, a] = spatial[a] - 1 - points_out[:, a]
    return out, label_out, band_out, points_out


__all__ = ["AugmentParams", "apply_augment", "sample_augment_params"]
