"""The trivial baseline: the best single-channel intensity window, tuned per case against its label.

A segmentation method earns its Dice only above this figure. For every channel ``c`` and every
window ``[lo, hi]`` the prediction is ``lo <= image[c] < hi``; the window with the highest Dice
against the label wins. Tuning it on the very case it is scored on makes it an upper bound of
what any global threshold can do (a window tuned on training cases and applied to a new case can
only do worse), so "model Dice minus window Dice" is a conservative measure of what the model
learned beyond intensity.

The search is exact over windows whose ends fall on bin edges of ``bins`` equal-count
(quantile) bins per channel: with 1024 bins a bin holds about 0.1% of the voxels, so the
result is within a fraction of a Dice point of the exhaustive optimum.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class WindowFit(NamedTuple):
    """The best window of one case.

    Attributes:
        channel: image channel the window applies to.
        lo: lower bound (inclusive).
        hi: upper bound (exclusive; ``inf`` when the window is open above).
        dice: Dice of ``lo <= image[channel] < hi`` against the label.
    """

    channel: int
    lo: float
    hi: float
    dice: float


def _best_in_channel(values: np.ndarray, foreground: np.ndarray, n_fg: int, bins: int) -> tuple[float, float, float]:
    """(dice, lo, hi) of the best window over one channel's flattened ``values``."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # a constant channel: the only window holds everything
        return 2.0 * n_fg / (values.size + n_fg), float(edges[0]), float("inf")
    # Bin b holds edges[b] <= v < edges[b + 1]; the last bin also holds the maximum.
    index = np.searchsorted(edges[1:-1], values, side="right")
    k = edges.size - 1
    total = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=k))]).astype(np.float64)
    fg = np.concatenate([[0], np.cumsum(np.bincount(index[foreground], minlength=k))]).astype(np.float64)
    # Window over bins i..j: rows i, columns j (only j >= i are windows).
    in_window = total[None, 1:] - total[:-1, None]
    fg_window = fg[None, 1:] - fg[:-1, None]
    scores = np.where(np.triu(np.ones((k, k), dtype=bool)), 2.0 * fg_window / (in_window + n_fg), -1.0)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    hi = float("inf") if j == k - 1 else float(edges[j + 1])
    return float(scores[i, j]), float(edges[i]), hi


def best_window(image: np.ndarray, label: np.ndarray, bins: int = 1024) -> WindowFit:
    """The single-channel intensity window with the highest Dice against ``label``.

    Args:
        image: ``(C, X, Y, Z)`` intensities (raw or normalised: the search is invariant to any
            increasing per-channel map).
        label: ``(X, Y, Z)``; foreground is ``label > 0``.
        bins: equal-count bins per channel whose edges bound the windows.

    Returns:
        The best ``WindowFit``. An empty label gives Dice 1.0 with an empty window.
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(label.shape):
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)}: need (C, X, Y, Z) and (X, Y, Z)")
    if bins < 1:
        raise ValueError(f"bins: must be >= 1, got {bins}")
    foreground = (label > 0).ravel()
    n_fg = int(np.count_nonzero(foreground))
    if n_fg == 0:
        return WindowFit(0, float("inf"), float("inf"), 1.0)
    best = WindowFit(0, 0.0, 0.0, -1.0)
    for c in range(image.shape[0]):
        score, lo, hi = _best_in_channel(image[c].ravel().astype(np.float32), foreground, n_fg, bins)
        if score > best.dice:
            best = WindowFit(c, lo, hi, score)
    return best


def apply_window(image: np.ndarray, fit: WindowFit) -> np.ndarray:
    """The window's prediction: ``(X, Y, Z)`` bool ``lo <= image[channel] < hi``."""
    channel = np.asarray(image)[fit.channel]
    return (channel >= fit.lo) & (channel < fit.hi)


__all__ = ["WindowFit", "apply_window", "best_window"]
