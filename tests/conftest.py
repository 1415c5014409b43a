"""Suite-wide settings: one torch thread per process (2-core CI) and no MLflow telemetry."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
TIER_TIMEOUT_S = {"unit": 300, "ray": 1200, "e2e": 1800}
"""Per-test time limit of each tier (pytest-timeout); a test may set its own ``timeout`` mark."""


def tier_of(path: Path) -> str | None:
    """The tier (``unit``, ``ray``, ``e2e``) a test file belongs to, or None outside them."""
    try:
        first = Path(path).resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None
    return first if first in TIER_TIMEOUT_S else None



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One tier per process (the ray tier's in-process Ray instance must be gone before the e2e
    tier starts its own clusters), and each tier's time limit on every test."""
    tiers = sorted({t for t in (tier_of(item.path) for item in items) if t})
    if len(tiers) > 1:
        raise pytest.UsageError(f"tests from several tiers ({', '.join(tiers)}) in one process: run one tier "
                                "per pytest process (make test runs tests/unit, tests/ray, tests/e2e in turn)")
    for item in items:
        tier = tier_of(item.path)
        if tier and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUT_S[tier]))
