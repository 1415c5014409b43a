"""The library must stay usable without Ray, MLflow or Zarr (ARCHITECTURE convention 1)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "zarr", "typer")
LIBRARY_MODULES = (
    "ossnet",
    "ossnet.config",
    "ossnet.model",
    "ossnet.sampling",
    "ossnet.augment",
    "ossnet.loss",
    "ossnet.training",
    "ossnet.inference",
    "ossnet.metrics",
    "ossnet.phantoms",
    "ossnet.checkpoint",
    "ossnet.preprocess",
    "ossnet.baselines",
)


def test_importing_ossnet_does_not_import_ray_mlflow_or_zarr() -> None:
    code = (
        "import sys\n"
        f"for name in {LIBRARY_MODULES!r}:\n"
        "    __import__(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ossnet imported: {out.stdout.strip()}"
