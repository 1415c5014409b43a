"""``ossnet infer --address`` with relative paths, as a user types it in their project folder.

The job runs on the cluster in an uploaded copy of the project, where a relative path means
nothing: every local path must be made absolute on the submitting machine first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from conftest import scans_and_model

if TYPE_CHECKING:
    from conftest import LocalCluster

pytestmark = pytest.mark.slow


def test_inference_with_relative_paths_runs_on_the_cluster(local_cluster: LocalCluster, tmp_path: Path) -> None:
    scans_and_model(tmp_path, 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(local_cluster.client_env)
    proc = subprocess.run([sys.executable, "-m", "ossnet_cli", "infer", "scans", "--output", "predictions",
                           "--model", "model.pt", "--mode", "dense", "--address", local_cluster.address],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert f"submitting inference of {tmp_path / 'scans'}" in proc.stdout
    report = pd.read_parquet(tmp_path / "predictions" / "report.parquet")
    assert sorted(report["case_id"]) == ["scan00", "scan01", "scan02"] and set(report["status"]) == {"ok"}
    assert sorted(p.name for p in (tmp_path / "predictions" / "masks").iterdir()) == [
        "scan00.nii.gz", "scan01.nii.gz", "scan02.nii.gz"]
