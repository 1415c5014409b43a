"""Synthetic BraTS-like and LiTS-like phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from ossnet.phantoms import BRATS_MODALITIES, brats_like, lits_like, phantom_dataset

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
