"""Names, defaults and limits of the inference options, importable without torch.

The command line builds its choices and help texts from these, and answers ``--help`` without
loading torch; ``ossnet.inference`` re-exports them next to the ``Inferer`` that uses them.
"""

from __future__ import annotations

MODES: tuple[str, ...] = ("dense", "mise", "mise_lowres")
DEFAULT_COARSE_STRIDE = 4
DEFAULT_SEED_THRESHOLD = 0.3
DEFAULT_PROBE_STRIDE = 8
DEFAULT_RECALL_MARGIN = 8.0
MAX_RECALL_MARGIN = 50.0  # logits; beyond this every cell of a float32 sigmoid is "uncertain"

__all__ = ["DEFAULT_COARSE_STRIDE", "DEFAULT_PROBE_STRIDE", "DEFAULT_RECALL_MARGIN", "DEFAULT_SEED_THRESHOLD",
           "MAX_RECALL_MARGIN", "MODES"]
