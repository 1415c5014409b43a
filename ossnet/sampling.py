"""Point sampling, patch extraction and training-row assembly: pure, seeded functions.

Points are integer voxel indices ``(N, 3)`` along the volume's ``(X, Y, Z)`` axes. Everything
here takes an explicit ``np.random.Generator``; nothing is precomputed on disk (the border band
is derived from the label on the fly, or passed in by a caller that caches it).

Patch geometry (``extract_patches``), per axis, for a point ``p`` and odd patch size ``k``:

* local patch: voxels ``p - k//2 .. p + k//2`` (centred on the point);
* multiscale window (variants B, D): the ``2k`` voxels ``p - k .. p + k - 1``, average-pooled by
  2 into ``k`` cells, cell ``j`` averaging voxels ``p - k + 2j`` and ``p - k + 2j + 1`` (the
  alignment of the reference code: the pooled patch is centred at ``p - 0.5``).

Voxels outside the volume read as zero (zero padding) in both.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from ossnet.augment import apply_augment, sample_augment_params
from ossnet.border import border_band, target_bands

if TYPE_CHECKING:
    from ossnet.config import AugmentConfig, ModelConfig, SamplingConfig

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------- point sampling


def sample_points(
    label: np.ndarray,
    n: int,
    border_ratio: float,
    rng: np.random.Generator,
    band_width: int = 6,
    band: np.ndarray | None = None,
    n_bands: int = 1,
) -> np.ndarray:
    """Draw voxel indices uniformly, a fraction of them from the border band.

    ``round(n * border_ratio)`` points are drawn (with replacement) from the band voxels, the
    rest uniformly over the volume; the result is shuffled. If the band is empty (empty or full
    label) every point is uniform. With ``n_bands > 1`` the band is a bit mask (bit ``t``: the
    band of target ``t``, see ``ossnet.border.target_bands``) and the border points are split
    evenly between the targets, so a small target gets as many as a large one; a target with an
    empty band gives its share to the uniform points.

    Args:
        label: (X, Y, Z) label (its shape defines the volume; read for the band if needed).
        n: number of points.
        border_ratio: fraction in [0, 1] drawn from the band.
        rng: source of randomness.
        band_width: band half-width, used only when ``band`` is None.
        band: precomputed band, either an (X, Y, Z) mask (non-zero = band) or (K, 3) voxel indices.
        n_bands: targets whose bands ``band`` holds as bits (1: any non-zero voxel is band).

    Returns:
        (n, 3) int64 voxel indices.
    """
    shape = tuple(int(s) for s in np.shape(label))
    if len(shape) != 3:
        raise ValueError(f"label: expected shape (X, Y, Z), got {shape}")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if not 0.0 <= border_ratio <= 1.0:
        raise ValueError(f"border_ratio: must be in [0, 1], got {border_ratio}")
    n_border = int(math.floor(n * border_ratio + 0.5))
    border = np.empty((0, 3), dtype=np.int64)
    if n_border > 0:
        if band is None:
            band = border_band(label, band_width)
        band = np.asarray(band)
        if band.ndim == 3 and n_bands > 1:
            if band.shape != shape:
                raise ValueError(f"band: mask shape {band.shape} does not match label shape {shape}")
            shares = np.full(n_bands, n_border // n_bands)
            shares[: n_border % n_bands] += 1
            picked_parts = []
            for t, share in enumerate(shares):
                flat = np.flatnonzero(band & np.uint8(1 << t)) if share else np.empty(0, np.int64)
                if flat.size:
                    picked_parts.append(flat[rng.integers(0, flat.size, size=int(share))])
            if picked_parts:
                picked = np.concatenate(picked_parts)
                border = np.stack(np.unravel_index(picked, shape), axis=1).astype(np.int64)
        elif band.ndim == 3:  # a mask of any dtype (a store may hold it as uint8)
            if band.shape != shape:
                raise ValueError(f"band: mask shape {band.shape} does not match label shape {shape}")
            flat = np.flatnonzero(band)
            if flat.size:
                picked = flat[rng.integers(0, flat.size, size=n_border)]
                border = np.stack(np.unravel_index(picked, shape), axis=1).astype(np.int64)
        else:
            if band.ndim != 2 or band.shape[1] != 3:
                raise ValueError(f"band: expected an (X, Y, Z) mask or (K, 3) indices, got shape {band.shape}")
            if len(band):
                border = band[rng.integers(0, len(band), size=n_border)].astype(np.int64)
        if border.shape[0] == 0:
            logger.debug("border band is empty; sampling all %d points uniformly", n)
    n_uniform = n - border.shape[0]
    uniform = rng.integers(0, shape, size=(n_uniform, 3), dtype=np.int64)
    points = np.concatenate([border, uniform], axis=0)
    return points[rng.permutation(n)]


# --------------------------------------------------------------------------- patches


def _gather(volume: torch.Tensor, start: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """Gather ``size^3`` voxels with stride ``step`` from ``start``, zero outside.

    Args:
        volume: (C, D0, D1, D2) contiguous.
        start: (N, 3) int64 index of element (0, 0, 0) of each patch; element ``(i, j, l)`` reads
            ``volume[:, start + step * (i, j, l)]``.

    Returns:
        (N, C, size, size, size) tensor of ``volume.dtype`` on ``volume.device``.
    """
    channels, dims = volume.shape[0], tuple(volume.shape[1:])
    n = start.shape[0]
    span = step * (size - 1)
    limit = torch.tensor(dims, device=start.device)
    inside = ((start >= 0) & (start + span < limit)).all(dim=1)
    n_inside = int(inside.sum())
    flat = volume.reshape(channels, -1)
    steps = torch.arange(size, device=start.device) * step
    ch = torch.arange(channels, device=start.device)
    plane = dims[1] * dims[2]

    def rows_path(s: torch.Tensor) -> torch.Tensor:
        # Each (i, j) row of a patch is `size` voxels spaced `step` along the last (contiguous)
        # axis: gather whole rows from a strided window view (fewer, cache-friendlier reads).
        windows = flat.unfold(1, span + 1, 1)[..., ::step]  # (C, L - span, size)
        row0 = ((s[:, 0:1] + steps) * plane)[:, :, None] + ((s[:, 1:2] + steps) * dims[2])[:, None, :]
        row0 = row0 + s[:, 2, None, None]
        return windows[ch[None, :, None, None], row0[:, None]]

    def clamped_path(s: torch.Tensor) -> torch.Tensor:
        coords = s[:, :, None] + steps  # (b, 3, size)
        valid = (coords >= 0) & (coords < limit[:, None])
        idx = [coords[:, a].clamp(0, dims[a] - 1) for a in range(3)]
        out = volume[
            ch[None, :, None, None, None],
            idx[0][:, None, :, None, None],
            idx[1][:, None, None, :, None],
            idx[2][:, None, None, None, :],
        ]
        mask = valid[:, 0, None, :, None, None] & valid[:, 1, None, None, :, None] & valid[:, 2, None, None, None, :]
        return out * mask.to(out.dtype)

    if n_inside == n:
        return rows_path(start)
    if n_inside == 0:
        return clamped_path(start)
    out = volume.new_empty((n, channels, size, size, size))
    out[inside] = rows_path(start[inside])
    outside = ~inside
    out[outside] = clamped_path(start[outside])
    return out


def pool_volume(volume: ArrayLike) -> ArrayLike:
    """2x2x2 box average of the zero-padded volume, for multiscale patches.

    ``out[:, i, j, l]`` is the mean of ``volume[:, i-1:i+1, j-1:j+1, l-1:l+1]`` with zeros outside,
    so a multiscale cell starting at voxel ``q`` is ``out[:, q + 1]``. Inference can compute this
    once per volume and pass it to ``extract_patches(..., pooled=...)``.

    Args:
        volume: (C, X, Y, Z) numpy array or torch tensor.

    Returns:
        (C, X + 1, Y + 1, Z + 1) of the same kind and device (float32 for integer input).
    """
    v: Any = volume  # numpy or torch throughout, as given
    if isinstance(v, torch.Tensor) and not v.is_floating_point():
        v = v.to(torch.float32)
    elif not isinstance(v, torch.Tensor) and not np.issubdtype(v.dtype, np.floating):
        v = np.asarray(v, dtype=np.float32)
    for axis in (1, 2, 3):
        shape = list(v.shape)
        shape[axis] += 1
        acc: Any
        if isinstance(v, torch.Tensor):
            acc = torch.zeros(shape, dtype=v.dtype, device=v.device)
        else:
            acc = np.zeros(shape, v.dtype)
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        acc[tuple(lo)] += v
        acc[tuple(hi)] += v
        v = acc
    v *= 0.125
    return v


def _as_tensor(volume: ArrayLike) -> torch.Tensor:
    if isinstance(volume, torch.Tensor):
        return volume.contiguous()
    array = np.ascontiguousarray(volume)
    with warnings.catch_warnings():
        # Read-only arrays (e.g. memory-mapped) are never written through this tensor.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def extract_patches(
    volume: ArrayLike,
    points: ArrayLike,
    size: int = 7,
    multiscale: bool = False,
    pooled: ArrayLike | None = None,
) -> ArrayLike:
    """Cubic patches around voxel points, zero padded (see the module docstring for geometry).

    One torch implementation serves numpy arrays (zero-copy) and tensors on any device; memory
    is the output plus O(N * size^2) indices, so callers bound it by chunking the points.

    Args:
        volume: (C, X, Y, Z) numpy array or torch tensor.
        points: (N, 3) integer voxel indices (numpy or torch).
        size: odd patch edge ``k``.
        multiscale: append the ``2k`` window average-pooled to ``k`` (C more channels).
        pooled: optional ``pool_volume(volume)`` to reuse across calls (multiscale only).

    Returns:
        (N, C * (2 if multiscale else 1), k, k, k) of the volume's kind, dtype and device.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: patch size must be a positive odd integer, got {size}")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape (N, 3), got {tuple(points.shape)}")
    is_numpy = not isinstance(volume, torch.Tensor)
    vol = _as_tensor(volume)
    pts = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points, device=vol.device)
    if pts.dtype.is_floating_point or pts.dtype == torch.bool:
        raise ValueError(f"points: need integer voxel indices, got dtype {pts.dtype}")
    pts = pts.to(torch.int64)
    if pts.shape[0] == 0:
        empty = vol.new_zeros((0, vol.shape[0] * (2 if multiscale else 1), size, size, size))
        return empty.numpy() if is_numpy else empty
    patches = _gather(vol, pts - size // 2, size, 1)
    if multiscale:
        if pooled is None:
            pooled_t = _as_tensor(pool_volume(vol))
        else:
            pooled_t = _as_tensor(pooled).to(vol.device)
            expected = (vol.shape[0],) + tuple(s + 1 for s in vol.shape[1:])
            if tuple(pooled_t.shape) != expected:
                raise ValueError(f"pooled: expected shape {expected}, got {tuple(pooled_t.shape)}")
        # Cell j starts at voxel p - k + 2j, i.e. pooled index p - k + 1 + 2j.
        coarse = _gather(pooled_t, pts - size + 1, size, 2)
        patches = torch.cat([patches, coarse.to(patches.dtype)], dim=1)
    return patches.numpy() if is_numpy else patches


# --------------------------------------------------------------------------- resolution helpers


def normalize_points(points: ArrayLike, shape: tuple[int, ...]) -> ArrayLike:
    """Voxel indices to decoder coordinates: ``points / (shape - 1) * 2 - 1``.

    Args:
        points: (..., 3) voxel indices (numpy or torch).
        shape: (X, Y, Z) spatial shape.

    Returns:
        (..., 3) float32 in [-1, 1], same kind and device as ``points``.
    """
    if len(shape) != 3:
        raise ValueError(f"shape: expected (X, Y, Z), got {shape}")
    denom = [float(max(int(s) - 1, 1)) for s in shape]
    if isinstance(points, torch.Tensor):
        scale = torch.tensor(denom, dtype=torch.float32, device=points.device)
        return points.to(torch.float32) / scale * 2.0 - 1.0
    scaled = np.asarray(points, dtype=np.float32) / np.asarray(denom, dtype=np.float32)
    return scaled * np.float32(2.0) - np.float32(1.0)


def downsample_image(image: ArrayLike, lowres_shape: tuple[int, int, int]) -> ArrayLike:
    """Trilinear resize (``align_corners=False``), the encoder input.

    Args:
        image: (C, X, Y, Z) numpy array or torch tensor.
        lowres_shape: target (x, y, z).

    Returns:
        (C, *lowres_shape) float32 of the input's kind (and device).
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (C, X, Y, Z), got {tuple(image.shape)}")
    is_numpy = not isinstance(image, torch.Tensor)
    tensor = _as_tensor(np.asarray(image, dtype=np.float32)) if is_numpy else cast(torch.Tensor, image).float()
    size = tuple(int(s) for s in lowres_shape)
    out = F.interpolate(tensor[None], size=size, mode="trilinear", align_corners=False)[0]
    return out.numpy() if is_numpy else out


def lowres_label(label: np.ndarray, factor: int) -> np.ndarray:
    """Max-pool a label by ``factor`` with ceil mode (a cell is 1 if any voxel in it is > 0).

    Args:
        label: (X, Y, Z) label.
        factor: cell edge in voxels (``ModelConfig.lowres_factor``).

    Returns:
        (ceil(X / f), ceil(Y / f), ceil(Z / f)) uint8 in {0, 1}.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label: expected shape (X, Y, Z), got {label.shape}")
    if factor < 1:
        raise ValueError(f"factor: must be >= 1, got {factor}")
    out = (label > 0).view(np.uint8)
    for axis in range(3):
        # reduceat over cell starts: the last, partial cell covers the remainder (ceil mode).
        out = np.maximum.reduceat(out, np.arange(0, label.shape[axis], factor), axis=axis)
    return out


# --------------------------------------------------------------------------- training rows


def training_sample(
    image: np.ndarray,
    label: np.ndarray,
    model_cfg: ModelConfig,
    sampling_cfg: SamplingConfig,
    augment_cfg: AugmentConfig,
    rng: np.random.Generator,
    band: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One training row: augment, sample points, extract patches, low-res input and reference.

    Points are sampled in the original frame (``band`` is the original label's band) and mapped
    through the augmentation with the image and label, so nothing but the image is resampled.

    Args:
        image: (C, X, Y, Z) normalised volume on ``model_cfg.volume_shape``.
        label: (X, Y, Z) label: binary, or in the source convention of ``model_cfg.targets``.
        model_cfg: model the row is for (shapes, patch size, low-res factor, targets).
        sampling_cfg: number of points and border sampling.
        augment_cfg: augmentation (``AugmentConfig.off()`` for none).
        rng: source of randomness.
        band: optional precomputed border band of ``label`` (mask or (K, 3) indices; for
            several targets the bit mask of ``ossnet.border.target_bands``).

    Returns:
        ``image_lowres`` (C, *lowres_input_shape) f32, ``points`` (n, 3) f32 in [-1, 1],
        ``patches`` (n, patch_channels, k, k, k) f32 (only when the model uses patches),
        ``labels`` and ``label_lowres``: binary (n,) f32 and (*latent_shape) f32; regions
        (n, K) f32 and (K, *latent_shape) f32; classes (n,) int64 class indices and
        (K, *latent_shape) f32 (one channel per class).
    """
    shape = tuple(int(s) for s in model_cfg.volume_shape)
    if image.ndim != 4 or tuple(image.shape[1:]) != shape:
        raise ValueError(f"image: expected (C, {', '.join(map(str, shape))}), got {tuple(image.shape)}")
    if image.shape[0] != model_cfg.encoder.in_channels:
        raise ValueError(f"image: {image.shape[0]} channels, model expects {model_cfg.encoder.in_channels}")
    if tuple(label.shape) != shape:
        raise ValueError(f"label: expected shape {shape}, got {tuple(label.shape)}")

    targets = model_cfg.targets
    multi = targets.kind != "binary"
    if multi and band is None and sampling_cfg.border_ratio > 0:
        band = target_bands(label, targets, sampling_cfg.band_width)
    params = sample_augment_params(augment_cfg, image, rng)
    voxels = sample_points(label, sampling_cfg.n_points, sampling_cfg.border_ratio, rng, sampling_cfg.band_width, band,
                           n_bands=targets.n_targets if multi else 1)
    image_aug, label_aug, _, moved = apply_augment(params, image, label, points=voxels)
    assert label_aug is not None and moved is not None
    voxels = moved

    row: dict[str, np.ndarray] = {
        "image_lowres": np.asarray(downsample_image(image_aug, model_cfg.lowres_input_shape)),
        "points": np.asarray(normalize_points(voxels, shape)),
    }
    if model_cfg.patch.enabled:
        patches = extract_patches(image_aug, voxels, model_cfg.patch.size, model_cfg.patch.multiscale)
        row["patches"] = np.asarray(patches, dtype=np.float32)
    row["labels"] = targets.point_targets(label_aug[voxels[:, 0], voxels[:, 1], voxels[:, 2]])
    if multi and targets.n_outputs > 1:
        label_low = np.stack([lowres_label(m, model_cfg.lowres_factor) for m in targets.output_masks(label_aug)])
    elif multi:  # one region: the model's single output is squeezed, as for binary
        label_low = lowres_label(targets.output_masks(label_aug)[0], model_cfg.lowres_factor)
    else:
        label_low = lowres_label(label_aug, model_cfg.lowres_factor)
    if label_low.shape[-3:] != tuple(model_cfg.latent_shape):
        raise ValueError(f"label_lowres: pooled shape {label_low.shape} != model latent shape {model_cfg.latent_shape}")
    row["label_lowres"] = label_low.astype(np.float32)
    return row


__all__ = [
    "border_band",
    "downsample_image",
    "extract_patches",
    "lowres_label",
    "normalize_points",
    "pool_volume",
    "sample_points",
    "training_sample",
]
