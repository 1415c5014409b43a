"""Names more than one pipeline stage agrees on (kept free of heavy imports).

MLflow tag names live in ``ossnet_pipelines.tracking.tags``; model choices (variants, presets, z-score
masks, resample modes) in ``ossnet.config`` and ``ossnet.geometry``.
"""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val", "test", "unassigned")
"""The split a store assigns each case to (``ossnet ingest --val-fraction``, ``--split``)."""

__all__ = ["SPLITS"]
