"""ossnet_bench.paper's pieces: one tiny run per model family, the aggregation, the goals, the report."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from ossnet_bench.paper import QUICK, RUNS, goals, summarise, write_report
from ossnet_bench.paper_runs import run_one

TINY = replace(QUICK, shape=(32, 32, 32), n_train=2, n_test=1, steps=2, n_points=256, crop=16,
               unet_channels=(4, 8), slice_batch=2)


@pytest.mark.parametrize("run", ["onet", "C_border", "unet3d", "unet3d_patch", "unet2d"])
def test_one_run_trains_and_scores_every_test_case(run: str) -> None:
    out = run_one({"run": run, "seed": 0, "plan": asdict(TINY)})
    assert out["run"] == run and len(out["dice"]) == len(out["hd95"]) == len(out["infer_s"]) == 1
    assert 0.0 <= out["dice"][0] <= 1.0 and out["hd95"][0] >= 0.0
    assert out["train_mb"] >= 0.0 and out["params"] > 0
    if run == "unet3d_patch":
        assert out["crop"] == [16, 16, 16]
    # The voxel networks evaluate every voxel; OSS-Net decodes with MISE, which may decode all of
    # them for a 2-step model whose logits are all near the threshold (within the recall margin).
    if run in ("onet", "C_border"):
        assert 0 < out["queries"][0] <= 32**3
    else:
        assert out["queries"][0] == 32**3
    json.dumps(out)  # the worker's result travels as JSON


def _outcome(run: str, seed: int, dice: float) -> dict:
    return {"run": run, "seed": seed, "dice": [dice, dice], "iou": [dice / 2] * 2, "hd95": [3.0, 5.0],
            "train_mb": 100.0 + seed, "train_s": 10.0, "infer_s": [1.0, 2.0], "queries": [10, 30], "params": 7}


def test_summary_goals_and_report(tmp_path: Path) -> None:
    outcomes = [_outcome(run, s, d + 0.01 * s) for run, d in
                [("onet", 0.5), ("A", 0.82), ("B", 0.84), ("C", 0.86), ("D", 0.85), ("unet3d", 0.87),
                 ("unet2d", 0.8), ("unet3d_patch", 0.9), ("C_border", 0.88)] for s in range(3)]
    table = summarise(outcomes)
    assert table["C"]["dice"] == pytest.approx(0.87) and table["C"]["dice_std"] == pytest.approx(np.std([0, .01, .02]))
    assert table["C"]["hd95"] == 4.0 and table["C"]["infer_s"] == 1.5 and table["C"]["queries"] == 20
    met = goals(table, trivial=0.5)
    assert met["C_at_least_0.80"] and met["C_at_least_trivial_plus_0.20"] and met["C_within_0.02_of_unet3d"]
    assert not met["C_within_0.02_of_unet3d_patch"]  # 0.87 vs 0.91
    assert not goals(table, trivial=0.7)["C_at_least_trivial_plus_0.20"]
    assert not goals({}, 0.1)["C_at_least_0.80"]  # a model that did not run fails its goals
    md, png = write_report(TINY, table, {"dice": 0.5, "hd95": 9.0}, met, {"crop": 16}, tmp_path, "cmd", 60.0)
    text = md.read_text()
    assert all(f"| {name}" in text for name in ("OSS-Net C ", "3D U-Net, crops", "intensity window"))
    assert "C within 0.02 of unet3d patch: NOT met" in text
    assert png.stat().st_size > 1000 and len(RUNS) == 9
