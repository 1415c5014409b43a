"""Full-resolution inference: dense chunked decoding and multiresolution isosurface extraction.

``Inferer`` (the strategy object) and ``InferenceResult`` live in ``inferer``; the MISE levels
in ``mise``; the rectilinear-grid helpers in ``grid``.
"""

from __future__ import annotations

from ossnet.inference.inferer import DEFAULT_COARSE_STRIDE, DEFAULT_SEED_THRESHOLD, MODES, InferenceResult, Inferer

__all__ = ["DEFAULT_COARSE_STRIDE", "DEFAULT_SEED_THRESHOLD", "InferenceResult", "Inferer", "MODES"]
