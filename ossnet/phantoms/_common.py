"""Shared pieces of the phantom generators: the case record and seeded field/shape primitives.

Reproducibility: label geometry uses only uniform draws and element-wise float32 arithmetic
(no transcendental functions or reductions), which IEEE platforms evaluate identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
BRATS_MODALITY_SCALE: tuple[float, ...] = (450.0, 650.0, 800.0, 1000.0)
"""Typical raw intensity of each BraTS-like modality (relative tissue values are scaled by it)."""


@dataclass
class PhantomCase:
    """One synthetic case.

    Attributes:
        case_id: unique id.
        image: (C, X, Y, Z) float32 raw intensities (not normalised).
        label: (X, Y, Z) uint8 in {0, 1}.
        affine: (4, 4) float64 voxel-to-world matrix.
        modalities: channel names.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modalities: tuple[str, ...] = BRATS_MODALITIES


def check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise ValueError(f"shape: need three sizes >= 8, got {tuple(shape)}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def spacing_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing: need three positive values, got {spacing}")
    return np.diag([float(s) for s in spacing] + [1.0])


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """Value noise in [-1, 1]: a random lattice with ``cells`` intervals per axis, smoothstep-interpolated.

    Separable; axes are processed last-to-first so the one full-size step copies whole
    contiguous slabs. Returns float32 of ``shape``.
    """
    values = rng.uniform(-1.0, 1.0, size=tuple(c + 1 for c in cells)).astype(np.float32)
    for axis in (2, 1, 0):
        n, c = shape[axis], cells[axis]
        u = (np.arange(n, dtype=np.float32) + np.float32(0.5)) * np.float32(c / n)
        i0 = np.minimum(u.astype(np.int64), c - 1)
        t = u - i0.astype(np.float32)
        w = (t * t * (np.float32(3.0) - np.float32(2.0) * t)).reshape([n if a == axis else 1 for a in range(3)])
        step = np.diff(values, axis=axis)
        values = np.take(values, i0, axis=axis)
        values += np.take(step, i0, axis=axis) * w
    return values


def cortex_ribbon(rng: np.random.Generator, shape: tuple[int, ...], depth: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Grey-matter fraction in [0, 1]: textured, rising towards the brain surface.

    ``clip(0.9 * (0.5 * fine + coarse) + gain * depth - offset, 0, 1)`` with two value-noise
    fields; ``depth`` grows towards the surface (a normalised squared radius, or minus an
    implicit function). Returns float32 of ``shape``.
    """
    grey = smooth_field(rng, shape, (12, 12, 10))
    grey *= np.float32(0.5)
    grey += smooth_field(rng, shape, (6, 6, 5))
    grey *= np.float32(0.9)
    grey += np.float32(gain) * depth
    grey -= np.float32(offset)
    return np.clip(grey, np.float32(0.0), np.float32(1.0), out=grey)


def ellipsoid_q(shape: tuple[int, ...], center: np.ndarray, radii: np.ndarray, origin=(0, 0, 0)) -> np.ndarray:
    """Normalised squared radius ``sum(((x - c) / r)^2)`` on a (sub)grid starting at ``origin``."""
    parts = []
    for axis in range(3):
        x = np.arange(shape[axis], dtype=np.float32) + np.float32(origin[axis] - center[axis])
        x /= np.float32(radii[axis])
        parts.append((x * x).reshape([shape[axis] if a == axis else 1 for a in range(3)]))
    return parts[0] + parts[1] + parts[2]


def sub_box(shape: tuple[int, ...], center: np.ndarray, extent: np.ndarray) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Sub-box ``center +- extent`` clipped to the grid: (slices, origin)."""
    lo = np.clip(np.floor(center - extent), 0, shape).astype(int)
    hi = np.clip(np.ceil(center + extent) + 1, 0, shape).astype(int)
    hi = np.maximum(hi, lo)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), tuple(int(a) for a in lo)


def blob(
    rng: np.random.Generator, box: tuple[slice, ...], origin, center, radii, amplitude: float, cells: int = 3
) -> np.ndarray:
    """Implicit function of a perturbed ellipsoid on ``box``: ``(1 + a * noise)^2 - q`` (> 0 inside)."""
    sub = tuple(s.stop - s.start for s in box)
    if min(sub) == 0:  # the box lies outside the grid (a vessel that walked off the volume)
        return np.zeros(sub, dtype=np.float32)
    perturb = smooth_field(rng, sub, (cells, cells, cells))
    perturb *= np.float32(amplitude)
    perturb += np.float32(1.0)
    perturb *= perturb
    perturb -= ellipsoid_q(sub, center, radii, origin)
    return perturb


def soft(s: np.ndarray, radius: float) -> np.ndarray:
    """Partial-volume membership from an implicit ``s`` (> 0 inside, about 2 * depth / radius)."""
    out = s * np.float32(radius / 2.0)
    out += np.float32(0.5)
    return np.clip(out, np.float32(0.0), np.float32(1.0), out=out)


def mix(base: np.ndarray, value: float, weight: np.ndarray) -> np.ndarray:
    """``base`` moved towards ``value`` by ``weight`` (in place)."""
    base += (np.float32(value) - base) * weight
    return base


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (1-D float32 input)."""
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    real *= real
    imag *= imag
    real += imag
    return np.sqrt(real, out=real)


def unit_ball(rng: np.random.Generator) -> np.ndarray:
    """Uniform point in the unit ball by rejection (uniform draws and exact arithmetic only)."""
    while True:
        v = rng.uniform(-1.0, 1.0, 3)
        if sum(float(x) * float(x) for x in v) <= 1.0:
            return v


__all__ = [
    "BRATS_MODALITIES",
    "BRATS_MODALITY_SCALE",
    "PhantomCase",
    "blob",
    "sub_box",
    "check_shape",
    "cortex_ribbon",
    "ellipsoid_q",
    "mix",
    "rician",
    "smooth_field",
    "soft",
    "spacing_affine",
    "unit_ball",
]
