"""PNG figures of volumes and segmentations (matplotlib, no pyplot, no MLflow).

Used by the quickstart (without MLflow) and by training's validation (logged to MLflow through
``ossnet_pipelines.tracking.log_figure_png``). Figures are drawn on a bare ``matplotlib.figure.Figure``
with the Agg canvas, so nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_AXIS_NAMES = ("X", "Y", "Z")


def lesion_centre(*masks: np.ndarray | None, shape: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Voxel centre of mass of the first non-empty mask, else the centre of the grid.

    Args:
        *masks: (X, Y, Z) arrays (any dtype; non-zero is foreground) or None, in priority order.
        shape: grid shape used when every mask is empty or None.

    Returns:
        (x, y, z) integer voxel indices inside the grid.
    """
    grid: tuple[int, ...] | None = shape
    for mask in masks:
        if mask is None:
            continue
        grid = mask.shape
        idx = np.argwhere(mask)
        if len(idx):
            centre = np.round(idx.mean(axis=0)).astype(int)
            return tuple(int(c) for c in centre)  # type: ignore[return-value]
    if grid is None:
        raise ValueError("lesion_centre: need at least one mask or a shape")
    return tuple(int(s) // 2 for s in grid)  # type: ignore[return-value]


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transposed so that the first remaining array axis runs horizontally in the picture.
    return np.take(volume, index, axis=axis).T


def slice_overlay_png(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray,
    path: str | os.PathLike[str],
    title: str = "",
    *,
    channel: int = 0,
    centre: tuple[int, int, int] | None = None,
    dpi: int = 80,
) -> Path:
    """Write a PNG with slices through the lesion centre along each axis.

    Rows are the X, Y and Z slices through ``centre`` (default: the reference's centre of mass,
    else the prediction's, else the grid centre). Columns are the image channel, the reference
    (green), the prediction (red) and both over the image (overlap yellow).

    Args:
        image: (C, X, Y, Z) or (X, Y, Z) intensities.
        reference: (X, Y, Z) reference mask, or None when no label is known (column omitted).
        prediction: (X, Y, Z) predicted mask (non-zero = foreground) or probability in [0, 1].
        path: output ``.png`` file; parent directories are created; written atomically.
        title: figure title (case id, epoch, Dice, ...).
        channel: image channel to show.
        centre: (x, y, z) voxel to slice through, overriding the lesion centre.
        dpi: output resolution.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    img = np.asarray(image)
    if img.ndim == 4:
        if not 0 <= channel < img.shape[0]:
            raise ValueError(f"slice_overlay_png: channel {channel} out of range for image of shape {img.shape}")
        img = img[channel]
    if img.ndim != 3:
        raise ValueError(f"slice_overlay_png: image must be (C,X,Y,Z) or (X,Y,Z), got shape {np.shape(image)}")
    pred = np.asarray(prediction, dtype=np.float32)
    ref = None if reference is None else np.asarray(reference) > 0
    for name, arr in (("prediction", pred), ("reference", ref)):
        if arr is not None and arr.shape != img.shape:
            raise ValueError(f"slice_overlay_png: {name} shape {arr.shape} != image shape {img.shape}")
    pred_mask = pred >= 0.5
    if centre is None:
        centre = lesion_centre(ref, pred_mask, shape=img.shape)
    centre = tuple(int(np.clip(c, 0, s - 1)) for c, s in zip(centre, img.shape))  # type: ignore[assignment]

    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0

    columns = ["image"] + (["reference"] if ref is not None else []) + ["prediction", "overlay"]
    fig = Figure(figsize=(2.4 * len(columns), 2.4 * 3 + (0.4 if title else 0.0)), dpi=dpi)
    axes = fig.subplots(3, len(columns), squeeze=False)
    for row, axis in enumerate(range(3)):
        index = centre[axis]
        base = _take(img, axis, index)
        p = _take(pred_mask, axis, index)
        r = _take(ref, axis, index) if ref is not None else None
        for col, kind in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            rgba = np.zeros(base.shape + (4,), dtype=np.float32)
            if kind in ("reference", "overlay") and r is not None:
                rgba[r] += (0.0, 1.0, 0.0, 0.45)
            if kind in ("prediction", "overlay"):
                rgba[p] += (1.0, 0.0, 0.0, 0.45)
            if kind != "image":
                ax.imshow(np.clip(rgba, 0.0, 1.0), origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(kind, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{_AXIS_NAMES[axis]} = {index}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote slice overlay %s through %s", out, centre)
    return out


__all__ = ["lesion_centre", "slice_overlay_png"]
