"""ossnet_bench.multiclass's pieces: one tiny run per data set and model, the summary and its goals."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from ossnet_bench.multiclass import run_one, summarise
from ossnet_bench.paper import QUICK

TINY = replace(QUICK, shape=(32, 32, 24), n_train=2, n_test=1, steps=2, n_points=256, unet_channels=(4, 8))
NAMES = {"brats": ("wt", "tc", "et"), "lits": ("liver", "tumour")}


@pytest.mark.parametrize("dataset", ["brats", "lits"])
@pytest.mark.parametrize("model", ["C", "unet3d"])
def test_one_run_scores_every_target_of_every_test_case(dataset: str, model: str) -> None:
    out = run_one({"dataset": dataset, "model": model, "seed": 0, "plan": asdict(replace(TINY, dataset=dataset))})
    assert tuple(out["targets"]) == NAMES[dataset]
    for scores in out["targets"].values():
        assert len(scores["dice"]) == len(scores["present"]) == 1 and 0.0 <= scores["dice"][0] <= 1.0
        assert scores["hd95"][0] >= 0.0
    if model == "C":  # one shared pass: never more than the targets refined one by one
        assert out["queries_binary"][0] <= out["queries"][0] <= out["queries_separately"][0]
    json.dumps(out)  # the worker's result travels as JSON


def _outcome(dataset: str, model: str, dice: float, queries: tuple[int, int] = (100, 80)) -> dict:
    out = {"dataset": dataset, "model": model, "seed": 0,
           "targets": {n: {"dice": [dice, 1.0], "hd95": [2.0, 0.0], "present": [True, False]} for n in NAMES[dataset]}}
    if model == "C":
        out.update(queries=[queries[0]], queries_binary=[queries[1]], queries_separately=[sum(queries)])
    return out


def test_summary_keys_and_goals() -> None:
    close = [_outcome("brats", "C", 0.80), _outcome("brats", "unet3d", 0.82), _outcome("lits", "C", 0.7),
             _outcome("lits", "unet3d", 0.7)]
    result = summarise(close)
    assert {f"dice_C_{n}" for n in ("wt", "tc", "et", "liver", "tumour")} <= set(result)
    assert result["targets_learned"] == ["wt", "tc", "et", "liver", "tumour"]
    assert result["dice_C_wt"] == 0.9 and result["dice_present_C_wt"] == 0.8  # the empty case scores 1
    assert result["queries_ratio"] == 1.25 and result["goals"] == {
        "dice_within_0.03_of_unet3d_on_every_target": True, "queries_at_most_1.5x_binary": True}
    far = summarise([_outcome("brats", "C", 0.7, (200, 100)), _outcome("brats", "unet3d", 0.8)])
    assert summarise([_outcome("lits", "C", 0.05), _outcome("lits", "unet3d", 0.02)])["targets_learned"] == []
    assert far["goals"] == {"dice_within_0.03_of_unet3d_on_every_target": False, "queries_at_most_1.5x_binary": False}
