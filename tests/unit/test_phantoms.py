"""Synthetic phantoms at both levels, and the intensity-window baseline that defines "hard"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ossnet.baselines.window import apply_window, best_window
from ossnet.phantoms import (
    BRATS_MODALITIES,
    brats_hard,
    brats_like,
    head_hard,
    lits_hard,
    lits_like,
    phantom_dataset,
    thick_slices,
)
from ossnet.phantoms.hard import BRATS_HARD_REFERENCE

SHAPE = (37, 41, 29)


@pytest.mark.parametrize("make", [brats_like, lits_like])
def test_same_seed_same_case_and_different_seeds_differ(make):
    a, b, c = make(SHAPE, seed=11), make(SHAPE, seed=11), make(SHAPE, seed=12)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


def test_brats_case_structure():
    case = brats_like(SHAPE, seed=3)
    assert case.image.shape == (4,) + SHAPE and case.image.dtype == np.float32
    assert case.label.shape == SHAPE and case.label.dtype == np.uint8
    assert set(np.unique(case.label)) == {0, 1}
    assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
    assert case.modalities == BRATS_MODALITIES == ("flair", "t1", "t1ce", "t2")
    assert np.isfinite(case.image).all() and (case.image >= 0).all()
    # Skull-stripped: exact zeros outside the brain, the same brain in every modality.
    brain = case.image[0] > 0
    assert (case.image[:, 0, 0, 0] == 0).all()
    assert ((case.image > 0) == brain).all()
    assert 0.2 < brain.mean() < 0.8
    assert brain[case.label > 0].all()


def test_lesions_are_visible_and_not_tiny():
    fractions, contrasts = [], []
    for case in phantom_dataset("brats", 6, seed=5):
        lesion = case.label > 0
        brain = (case.image[0] > 0) & ~lesion
        fractions.append(lesion.mean())
        flair, t2 = case.image[0], case.image[3]
        contrasts.append(flair[lesion].mean() / flair[brain].mean())
        assert t2[lesion].mean() > 1.2 * np.median(t2[brain])
    assert min(fractions) > 1e-3 and max(fractions) < 0.2
    assert min(contrasts) > 1.3


def test_lesion_shapes_are_irregular():
    # A perfect ellipsoid fills pi/6 of its bounding box; perturbed blobs deviate from it.
    fills = []
    for case in phantom_dataset("brats", 6, seed=6):
        idx = np.argwhere(case.label)
        box = np.prod(idx.max(axis=0) - idx.min(axis=0) + 1)
        fills.append(len(idx) / box)
    assert np.std(fills) > 0.01


def test_empty_cases_are_empty():
    assert not brats_like(SHAPE, seed=1, empty=True).label.any()
    assert not lits_like(SHAPE, seed=1, empty=True).label.any()
    cases = phantom_dataset("brats", 7, shape=SHAPE, seed=2, empty_every=3)
    empty = [i for i, c in enumerate(cases) if not c.label.any()]
    assert empty == [2, 5]


def test_lits_case_structure():
    case = lits_like(SHAPE, seed=4, spacing=(0.7, 0.7, 2.0))
    assert case.image.shape == (1,) + SHAPE and case.modalities == ("ct",)
    np.testing.assert_allclose(np.diag(case.affine), [0.7, 0.7, 2.0, 1.0])
    liver = case.label > 0
    assert 0.01 < liver.mean() < 0.3
    ct = case.image[0]
    assert ct[0, 0, :].mean() < -800  # air in the corner
    assert ct[liver].mean() > ct[~liver & (ct > -50) & (ct < 300)].mean() + 20


def test_phantom_dataset_ids_and_independence_of_n():
    small = phantom_dataset("brats", 2, shape=SHAPE, seed=0)
    large = phantom_dataset("brats", 3, shape=SHAPE, seed=0)
    other = phantom_dataset("brats", 2, shape=SHAPE, seed=1)
    assert [c.case_id for c in large] == ["brats-0-0000", "brats-0-0001", "brats-0-0002"]
    for a, b in zip(small, large):
        np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(small[1].image, other[0].image)  # seeds do not overlap by offset
    assert phantom_dataset("lits", 1, shape=SHAPE)[0].image.shape == (1,) + SHAPE
    assert phantom_dataset("brats", 1)[0].image.shape == (4, 64, 64, 48)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        phantom_dataset("mnist", 1)
    with pytest.raises(ValueError, match="shape"):
        brats_like((4, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        lits_like(SHAPE, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="level"):
        phantom_dataset("head", 1, level="easy")
    with pytest.raises(ValueError, match="level"):
        phantom_dataset("brats", 1, level="medium")
    with pytest.raises(ValueError, match="slice_factor"):
        phantom_dataset("brats", 1, level="hard", slice_factor=0)


# --------------------------------------------------------------------------- hard level


def test_best_window_recovers_a_planted_window_on_the_right_channel():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, size=(3, 20, 22, 18)).astype(np.float32)
    label = (image[1] >= 30) & (image[1] < 45)
    fit = best_window(image, label)
    assert fit.channel == 1 and fit.dice > 0.99
    assert 29 <= fit.lo <= 31 and 44 <= fit.hi <= 46
    assert np.mean(apply_window(image, fit) == label) > 0.995
    # An open-ended window (everything above a level) has hi = inf, so the maximum is inside.
    top = best_window(image, image[2] >= 70)
    assert top.channel == 2 and top.hi == float("inf") and top.dice > 0.99
    assert best_window(image, np.zeros(label.shape)).dice == 1.0


@pytest.mark.parametrize("kind, shape", [("brats", (96, 96, 64)), ("head", (64, 72, 80)), ("lits", (64, 64, 64))])
def test_no_intensity_window_solves_the_hard_sets(kind, shape):
    cases = phantom_dataset(kind, 5, shape=shape, seed=0, level="hard")
    scores = [best_window(c.image, c.label).dice for c in cases]
    assert np.mean(scores) < 0.6, scores
    assert all(c.label.any() for c in cases)


def test_the_easy_brats_set_is_solved_by_a_window():
    # The contrast that makes the hard level necessary (and proves the window search works).
    scores = [best_window(c.image, c.label).dice for c in phantom_dataset("brats", 3, shape=(96, 96, 64))]
    assert min(scores) > 0.9


def test_hard_brats_lesions_match_normal_tissue_in_every_modality():
    case = brats_hard((96, 96, 64), seed=4)
    lesion = case.label > 0
    brain = (case.image[0] > 0) & ~ndimage.binary_dilation(lesion, iterations=2)
    for c in range(4):
        lo, hi = np.percentile(case.image[c][lesion], [25, 75])
        normal = case.image[c][brain]
        inside = np.mean((normal >= lo) & (normal <= hi))
        # At least as many normal voxels share the lesion's interquartile range as there are lesion voxels.
        assert inside * normal.size > lesion.sum(), (case.modalities[c], inside)


def test_a_third_of_hard_brats_cases_have_small_satellite_lesions():
    with_satellites = 0
    cases = phantom_dataset("brats", 16, shape=BRATS_HARD_REFERENCE, seed=3, level="hard")
    for case in cases:
        components, n = ndimage.label(case.label)
        sizes = ndimage.sum_labels(np.ones(case.label.shape), components, index=np.arange(1, n + 1))
        # A ball of radius 2-4 voxels holds 33-268 voxels; the oedema rim adds some.
        with_satellites += bool(np.any((sizes >= 15) & (sizes <= 600)))
    assert with_satellites >= 0.3 * len(cases)
    radii = [np.cbrt(3 * c.label.sum() / (4 * np.pi)) for c in cases]
    assert max(radii) > 2 * min(radii)  # a spread of lesion sizes


def test_small_lesion_cases_have_isolated_nodules_of_radius_1_5_to_5():
    from ossnet.phantoms.hard import brats_hard

    counts, far = [], 0
    for seed in range(12):
        case = brats_hard((120, 120, 80), seed=seed, lesions="small")
        components, n = ndimage.label(case.label)
        sizes = ndimage.sum_labels(np.ones(case.label.shape), components, index=np.arange(1, n + 1))
        radii = np.cbrt(3 * sizes / (4 * np.pi))
        assert 1 <= n <= 6 and radii.max() <= 6.0, (seed, radii)  # a rim of noise around radius <= 5
        counts.append(n)
        centres = np.array(ndimage.center_of_mass(case.label, components, range(1, n + 1)))
        if n >= 2:
            gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(n) * 1e9
            far += bool((gaps.min(axis=1) >= 30).any())  # a nodule no other one hints at
    assert min(counts) == 1 and max(counts) >= 4 and far >= 2
    assert np.array_equal(brats_hard((64, 64, 48), seed=5, lesions="small").label,
                          brats_hard((64, 64, 48), seed=5, lesions="small").label)
    with pytest.raises(ValueError, match="lesions: must be one of mixed, small"):
        brats_hard((64, 64, 48), lesions="tiny")


def test_hard_head_is_a_skull_stripping_task():
    case = head_hard((64, 72, 80), seed=2)
    brain = case.label > 0
    assert case.modalities == ("t1",) and case.image.shape == (1, 64, 72, 80)
    assert 0.05 < brain.mean() < 0.3
    t1 = case.image[0]
    outside = ~ndimage.binary_dilation(brain, iterations=2) & (t1 > 0.4 * np.median(t1[brain]))
    # More non-brain tissue than brain sits in the brain's intensity range.
    lo, hi = np.percentile(t1[brain], [10, 90])
    assert np.count_nonzero((t1 >= lo) & (t1 <= hi) & outside) > 0.8 * brain.sum()
    assert ndimage.label(brain)[1] == 1  # one brain
    assert not head_hard((64, 72, 80), seed=2, empty=True).label.any()


def test_hard_lits_liver_overlaps_other_organs_in_hu():
    case = lits_hard((64, 64, 64), seed=1)
    liver = case.label > 0
    ct = case.image[0]
    lo, hi = np.percentile(ct[liver], [25, 75])
    others = ~ndimage.binary_dilation(liver, iterations=2) & (ct >= lo) & (ct <= hi)
    assert np.count_nonzero(others) > 0.5 * liver.sum()
    np.testing.assert_allclose(np.diag(case.affine), [0.8, 0.8, 1.5, 1.0])


@pytest.mark.parametrize("kind", ["brats", "head", "lits"])
def test_hard_cases_are_reproducible(kind):
    a = phantom_dataset(kind, 1, shape=(40, 44, 36), seed=9, level="hard")[0]
    again = phantom_dataset(kind, 1, shape=(40, 44, 36), seed=9, level="hard")[0]
    np.testing.assert_array_equal(a.image, again.image)
    np.testing.assert_array_equal(a.label, again.label)
    assert a.case_id == f"{kind}-hard-9-0000"
    assert np.isfinite(a.image).all() and set(np.unique(a.label)) <= {0, 1}


def test_thick_slices_average_thin_ones():
    thin = brats_hard((40, 40, 36), seed=1, spacing=(1.0, 1.0, 1.0))
    thick = thick_slices(brats_hard, (40, 40, 12), 3, seed=1, spacing=(1.0, 1.0, 3.0))
    assert thick.image.shape == (4, 40, 40, 12) and thick.label.shape == (40, 40, 12)
    np.testing.assert_allclose(thick.image[:, :, :, 2], thin.image[:, :, :, 6:9].mean(axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(thick.label[:, :, 2], thin.label[:, :, 6:9].sum(axis=-1) >= 2)
    np.testing.assert_allclose(np.diag(thick.affine), [1.0, 1.0, 3.0, 1.0])
    cases = phantom_dataset("lits", 1, shape=(40, 40, 10), level="hard", slice_factor=3)
    np.testing.assert_allclose(np.diag(cases[0].affine), [0.8, 0.8, 4.5, 1.0])


def test_report_prints_the_window_table_and_json(capsys):
    from ossnet.phantoms.__main__ import main

    assert main(["--report", "--cases", "1", "--sets", "brats-easy", "head-hard"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("| set |") and any(line.startswith("| head-hard |") for line in lines)
    result = json.loads(lines[-1])
    assert set(result) == {"brats-easy", "head-hard"}
    assert result["brats-easy"]["mean"] > 0.9 > 0.6 > result["head-hard"]["mean"]
