"""Crop-trained voxel networks, as nnU-Net and MONAI train them: random crops with foreground
oversampling for training, a sliding window with Gaussian blending for inference.

A full-volume 3D U-Net (the paper's baseline) needs memory that grows with the volume; trained
on fixed-size crops its memory is fixed by the crop, whatever the volume. This is the baseline a
user compares OSS-Net with at equal training memory.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn


def random_crop_starts(
    shape: Sequence[int],
    crop: Sequence[int],
    label: np.ndarray,
    n: int,
    rng: np.random.Generator,
    foreground_fraction: float = 1.0 / 3.0,
) -> np.ndarray:
    """Start corners of ``n`` random crops; a fraction is centred on a random foreground voxel.

    nnU-Net forces a third of its training crops to contain foreground (its ``oversample
    foreground percent``); without it, small targets are rarely seen.

    Args:
        shape: volume ``(X, Y, Z)``.
        crop: crop size per axis (at most the volume's; callers pad smaller volumes first).
        label: ``(X, Y, Z)`` label; foreground is ``label > 0``.
        n: number of crops.
        rng: source of randomness.
        foreground_fraction: share of crops centred on foreground (when there is any).

    Returns:
        ``(n, 3)`` int64 start corners, each crop inside the volume.
    """
    dims = np.asarray(shape, dtype=np.int64)
    box = np.asarray(crop, dtype=np.int64)
    if np.any(box > dims) or np.any(box < 1):
        raise ValueError(f"crop {tuple(box)} must fit the volume {tuple(dims)}")
    high = dims - box + 1
    starts = rng.integers(0, high, size=(n, 3))
    foreground = np.argwhere(np.asarray(label) > 0)
    n_fg = int(round(n * foreground_fraction)) if len(foreground) else 0
    if n_fg:
        centres = foreground[rng.integers(0, len(foreground), size=n_fg)]
        starts[:n_fg] = np.clip(centres - box // 2, 0, high - 1)
    return starts[rng.permutation(n)]


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125) -> Tensor:
    """Gaussian weights over a window (sigma = ``sigma_scale`` x window size, max 1), as nnU-Net.

    Returns ``roi``-shaped float32 with a positive minimum, so every voxel gets some weight.
    """
    axes = []
    for size in roi:
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-3)
        x = torch.arange(size, dtype=torch.float32)
        axes.append(torch.exp(-0.5 * ((x - centre) / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    positive = weights[weights > 0]
    return torch.clamp(weights, min=float(positive.min()))


def _window_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis: ``0, step, ...`` and a last one flush with the end."""
    if roi >= size:
        return [0]
    n = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray | Tensor,
    roi: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
) -> Tensor:
    """Logits of a whole volume from a network applied to overlapping windows, Gaussian-blended.

    Args:
        model: maps ``[B, C, *roi]`` to ``[B, K, *roi]`` logits.
        image: ``(C, X, Y, Z)`` volume; axes smaller than ``roi`` are zero-padded at the far end.
        roi: window size per axis.
        overlap: fraction of a window shared with its neighbour along each axis (0 to < 1).
        batch_size: windows per forward pass.
        sigma_scale: Gaussian sigma as a fraction of the window (``gaussian_importance``).

    Returns:
        Blended logits ``[K, X, Y, Z]`` float32 on the CPU.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: must be in [0, 1), got {overlap}")
    volume = torch.as_tensor(image).float()
    if volume.dim() != 4:
        raise ValueError(f"image: expected (C, X, Y, Z), got shape {tuple(volume.shape)}")
    shape = tuple(int(s) for s in volume.shape[1:])
    roi = tuple(int(r) for r in roi)
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    if padded != shape:
        pad: list[int] = []
        for s, p in zip(reversed(shape), reversed(padded)):
            pad += [0, p - s]
        volume = torch.nn.functional.pad(volume, pad)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    weights = gaussian_importance(roi, sigma_scale).to(device)
    steps = [max(int(r * (1.0 - overlap)), 1) for r in roi]
    corners = list(itertools.product(*(_window_starts(s, r, st) for s, r, st in zip(padded, roi, steps))))
    logits: Tensor | None = None
    norm = torch.zeros(padded, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(corners), batch_size):
                chunk = corners[i : i + batch_size]
                windows = torch.stack([
                    volume[:, a : a + roi[0], b : b + roi[1], c : c + roi[2]] for a, b, c in chunk
                ]).to(device)
                out = model(windows).float()
                if logits is None:
                    logits = torch.zeros((out.shape[1],) + padded, device=device)
                for (a, b, c), o in zip(chunk, out):
                    logits[:, a : a + roi[0], b : b + roi[1], c : c + roi[2]] += o * weights
                    norm[a : a + roi[0], b : b + roi[1], c : c + roi[2]] += weights
    finally:
        model.train(was_training)
    assert logits is not None
    blended = logits / norm
    return blended[:, : shape[0], : shape[1], : shape[2]].cpu().contiguous()


__all__ = ["gaussian_importance", "random_crop_starts", "sliding_window_predict"]
