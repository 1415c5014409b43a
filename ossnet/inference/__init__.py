"""Full-resolution inference: dense chunked decoding and multiresolution isosurface extraction.

``Inferer`` (the strategy object) and ``InferenceResult`` live in ``inferer``; the MISE levels
in ``mise``; the rectilinear-grid helpers in ``grid``.
"""

from __future__ import annotations

from ossnet.inference.inferer import (
    DEFAULT_COARSE_STRIDE,
    DEFAULT_PROBE_STRIDE,
    DEFAULT_RECALL_MARGIN,
    DEFAULT_SEED_THRESHOLD,
    MAX_RECALL_MARGIN,
    MODES,
    InferenceResult,
    Inferer,
    region_probabilities,
)

__all__ = [
    "DEFAULT_COARSE_STRIDE",
    "DEFAULT_PROBE_STRIDE",
    "DEFAULT_RECALL_MARGIN",
    "DEFAULT_SEED_THRESHOLD",
    "MAX_RECALL_MARGIN",
    "InferenceResult",
    "Inferer",
    "MODES",
    "region_probabilities",
]
