"""Racing promotions against a real ``mlflow server``: several processes register versions of
one model at the same moment and each tries to move ``champion``.

Whatever the order their calls reach the server, the best-scoring version must end up holding
the alias, every version must stay registered, and the losers must not hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from ossnet.checkpoint import PreprocessSpec, save_checkpoint
from ossnet.config import model_config
from ossnet.model import build_model
from ossnet_pipelines.tracking import RunLogger

if TYPE_CHECKING:
    from conftest import MlflowServer

pytestmark = pytest.mark.slow

RACER = Path(__file__).with_name("promotion_racer.py")
# Three rounds, the best score in a different position each time (first, middle, last to start).
ROUNDS = ((0.91, 0.62, 0.75, 0.88), (0.62, 0.75, 0.93, 0.88), (0.70, 0.62, 0.75, 0.95))
RACE_TIMEOUT_S = 300


def test_concurrent_promotions_leave_the_best_version_as_champion(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    grid = (16, 16, 16)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=grid)).eval()
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", model, PreprocessSpec(modalities=("t1",), volume_shape=grid))
    with RunLogger("race-model", experiment="ossnet-race-e2e", tracking_uri=mlflow_server.uri) as run:
        info = run.log_model_bundle(ckpt, name="model")
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for index, scores in enumerate(ROUNDS):
        name = f"race-{index}"
        start_at = time.time() + 8.0  # after every racer has imported MLflow
        procs = [subprocess.Popen([sys.executable, str(RACER), mlflow_server.uri, info.model_uri, name, repr(score),
                                   repr(start_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for score in scores]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=RACE_TIMEOUT_S)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        versions = {int(mv.version): float(mv.tags["test_dice.race"])
                    for mv in client.search_model_versions(f"name = '{name}'")}
        assert sorted(versions.values()) == sorted(scores)  # every racer's version is registered once
        best = max(versions, key=lambda v: versions[v])
        champion = client.get_registered_model(name).aliases["champion"]
        assert int(champion) == best, (name, versions, results)
        for version in versions:
            aliases = client.get_model_version(name, str(version)).aliases
            assert ("champion" in aliases) == (version == best)
        # The best racer always sees itself win; a worse one may have held the alias for a moment
        # before the best version existed, never after.
        (best_result,) = [r for r in results if r["version"] == best]
        assert best_result["promoted"] and best_result["champion"] == best, results
