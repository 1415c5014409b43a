"""Multi-target stores through the pipeline: phantoms with sub-regions, training jobs that take
the store's target map, validation scored per target with the challenge conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ossnet.config import AugmentConfig, ConfigError, SamplingConfig
from ossnet.inference import Inferer
from ossnet.metrics import BRATS_HD95_EMPTY, pooled_dice, target_scores
from ossnet.model import build_model
from ossnet.phantoms.hard import brats_hard, lits_hard
from ossnet.targets import TARGET_PRESETS
from ossnet_pipelines.data import SampleSpec
from ossnet_pipelines.ingest import IngestJob, ingest
from ossnet_pipelines.jobconfig import load_job
from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_brats_archive
from ossnet_pipelines.train.job import TrainJob, check_against_store
from ossnet_pipelines.train.validation import Validator, summarize

GRID = (32, 32, 24)
BRATS = TARGET_PRESETS["brats-regions"]


def test_phantoms_label_sub_regions_without_changing_the_binary_case() -> None:
    for seed in range(3):
        binary, regions = brats_hard(GRID, seed=seed), brats_hard(GRID, seed=seed, regions=True)
        np.testing.assert_array_equal(binary.image, regions.image)
        np.testing.assert_array_equal(binary.label, (regions.label > 0).astype(np.uint8))
        assert set(np.unique(regions.label)) <= {0, 1, 2, 4}
        binary, classes = lits_hard(GRID, seed=seed), lits_hard(GRID, seed=seed, classes=True)
        np.testing.assert_array_equal(binary.label, (classes.label > 0).astype(np.uint8))
        assert set(np.unique(classes.label)) <= {0, 1, 2}
    labels = [brats_hard((64, 64, 48), seed=s, regions=True).label for s in range(3)]
    assert all({2, 4} <= set(np.unique(lab)) for lab in labels)  # oedema and enhancing core in every case


def test_target_scores_follow_the_brats_2020_conventions() -> None:
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = 2
    ref[3:5, 3:5, 3:5] = 4
    scores = target_scores(ref, ref, BRATS)
    assert scores["dice_wt"] == scores["dice_et"] == 1.0 and scores["hd95_wt"] == 0.0
    # No tumour core in either: perfect; ET predicted where there is none: Dice 0, HD95 373.13.
    no_core = np.where(ref == 4, 2, ref).astype(np.uint8)
    both_empty = target_scores(no_core, no_core, BRATS)
    assert (both_empty["dice_tc"], both_empty["hd95_tc"]) == (1.0, 0.0)
    one_empty = target_scores(ref, no_core, BRATS)
    assert (one_empty["dice_et"], one_empty["hd95_et"]) == (0.0, BRATS_HD95_EMPTY)
    # Global Dice pools the voxels of all cases; the per-case mean does not.
    cases = [target_scores(ref, ref, BRATS), one_empty]
    assert pooled_dice(cases, "et") == pytest.approx(2 * 8 / (2 * 8 + 8))


@pytest.fixture(scope="module")
def regions_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("regions")
    cases = [brats_hard(GRID, seed=s, regions=True, case_id=f"case{s}") for s in range(4)]
    archive = write_brats_archive(cases, root / "archive")
    store = str(root / "store.zarr")
    report = ingest(IngestJob(source=str(archive), store=store, preset="tiny", volume_shape=GRID, band_width=2,
                              val_fraction=0.5, targets="brats-regions"))
    assert report.ok, report.table()
    return store


def _job(store: str, **overrides: object) -> TrainJob:
    base = {"store": store, "model.preset": "tiny", "model.volume_shape": list(GRID), "scaling.num_workers": 0,
            "train.batch_size": 2, "tracking.enabled": False}
    return load_job(TrainJob, None, list({**base, **overrides}.items()))


def test_a_training_job_takes_the_store_target_map_and_checks_its_own(regions_store: str) -> None:
    facts = check_against_store(_job(regions_store))
    assert facts.model.targets == BRATS
    assert check_against_store(_job(regions_store, **{"model.targets": "brats-regions"})).model.targets == BRATS
    with pytest.raises(ConfigError, match=r"^model.targets: lits-classes but the store .* holds regions wt=1,2,4"):
        check_against_store(_job(regions_store, **{"model.targets": "lits-classes"}))
    with pytest.raises(ConfigError, match=r"^train.target_weights: 2 weights for the 3 outputs"):
        check_against_store(_job(regions_store, **{"train.target_weights": [1, 2]}))
    with pytest.raises(ConfigError, match=r"^validation.objective: must be 'mean' or a target of the store \(wt, tc, et\)"):
        check_against_store(_job(regions_store, **{"validation.objective": "core"}))


def test_validation_scores_every_target_and_pools_the_global_dice(regions_store: str) -> None:
    facts = check_against_store(_job(regions_store))
    torch.manual_seed(0)
    model = build_model(facts.model).eval()
    store = open_store(regions_store)
    spec = SampleSpec.for_store(store, facts.model, SamplingConfig(256, 0.5, 2), AugmentConfig.off(), 0, 1)
    validator = Validator(store_url=regions_store, case_ids=facts.val_cases, spec=spec,
                          inferer=Inferer(mode="mise_lowres", chunk_points=4096), alpha=0.1, objective="et")
    scores, _ = validator(model, epoch=1)
    assert len(scores) == len(facts.val_cases) >= 1
    for score in scores:
        assert score["dice"] == score["dice_et"]  # the objective decides what val_dice means
        assert {f"hd95_{n}" for n in BRATS.names} <= set(score) and score["points_wt"] > 0
    metrics = summarize(scores)
    for name in BRATS.names:
        assert f"val_dice_{name}" in metrics and f"val_global_dice_{name}" in metrics and f"val_hd95_{name}" in metrics
    assert metrics["val_dice"] == pytest.approx(np.mean([s["dice_et"] for s in scores]))


def test_predict_volume_returns_the_label_map_and_a_probability_map_per_target() -> None:
    from ossnet.config import model_config
    from ossnet_pipelines.tracking.predict import make_inferer, predict_volume

    torch.manual_seed(0)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=GRID, targets=BRATS)).eval()
    with torch.no_grad():
        model.decoder.fc_out.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    scan = np.random.default_rng(0).normal(size=(37, 29, 19)).astype(np.float32)
    out = predict_volume(model, scan, make_inferer(model, mode="dense", chunk_points=4096))
    assert out.probability.shape == (3, *scan.shape) and out.mask.shape == scan.shape
    assert set(np.unique(out.mask)) <= {0, 1, 2, 4} and len(np.unique(out.mask)) >= 2
    np.testing.assert_array_equal(out.mask, BRATS.label_map(out.probability >= 0.5))
