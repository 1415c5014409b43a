"""Dense metrics: values on hand-checkable masks, empty conventions, numpy/torch parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ossnet.metrics import confusion_counts, dice, iou, volume_ml

SHAPE = (37, 41, 29)


def _boxes() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros(SHAPE, dtype=bool)
    ref = np.zeros(SHAPE, dtype=bool)
    pred[2:12, 3:8, 4:9] = True  # 10*5*5 = 250 voxels
    ref[7:17, 3:8, 4:9] = True  # 250 voxels, overlap x 7..11 -> 5*5*5 = 125
    return pred, ref


def test_confusion_counts_on_overlapping_boxes() -> None:
    pred, ref = _boxes()
    c = confusion_counts(pred, ref)
    assert (c.tp, c.fp, c.fn) == (125, 125, 125)
    assert c.tn == int(np.prod(SHAPE)) - 375


def test_dice_and_iou_values() -> None:
    pred, ref = _boxes()
    assert dice(pred, ref) == pytest.approx(2 * 125 / 500)
    assert iou(pred, ref) == pytest.approx(125 / 375)
    assert dice(ref, ref) == 1.0 and iou(ref, ref) == 1.0
    assert dice(pred, ~pred) == 0.0


def test_empty_conventions() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    one = empty.copy()
    one[5, 6, 7] = True
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert iou(one, empty) == 0.0 and iou(empty, one) == 0.0


def test_torch_numpy_parity_and_non_bool_inputs() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random(SHAPE) > 0.6
    ref = rng.random(SHAPE) > 0.5
    expected = dice(pred, ref)
    assert dice(torch.from_numpy(pred), torch.from_numpy(ref)) == pytest.approx(expected)
    assert dice(torch.from_numpy(pred), ref) == pytest.approx(expected)
    assert dice(pred.astype(np.uint8), ref.astype(np.float32)) == pytest.approx(expected)
    assert iou(torch.from_numpy(pred.astype(np.uint8)), torch.from_numpy(ref)) == pytest.approx(iou(pred, ref))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((3, 4, 5), bool), np.zeros((3, 4, 6), bool))


def test_volume_ml() -> None:
    pred, _ = _boxes()
    assert volume_ml(pred, (1.0, 1.0, 1.0)) == pytest.approx(0.25)
    assert volume_ml(torch.from_numpy(pred), (2.0, 1.0, 0.5)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(pred, (1.0, 0.0, 1.0))


def test_collapse_warning_flags_empty_and_tiny_predictions():
    from ossnet.metrics import collapse_warning

    assert collapse_warning([100, 50], [120, 40]) is None
    assert collapse_warning([0, 0], [0, 0]) is None  # nothing to find, nothing found
    assert collapse_warning([5, 0], [0, 0]) is None  # false positives are not a collapse
    message = collapse_warning([0, 0], [120, 40])
    assert message is not None and "no foreground" in message and "160" in message
    message = collapse_warning([10, 0], [120, 40])
    assert message is not None and "0.062" in message and "1 of 2 cases" in message
    assert collapse_warning([16, 0], [120, 40]) is None  # exactly 1/10 is accepted
    with pytest.raises(ValueError, match="2 predictions for 1"):
        collapse_warning([1, 2], [3])


def test_hd95_of_shifted_boxes_and_empty_conventions():
    from ossnet.metrics import hd95

    ref = np.zeros((30, 30, 30), bool)
    ref[10:20, 10:20, 10:20] = True
    assert hd95(ref, ref) == 0.0
    shifted = np.roll(ref, 3, axis=0)
    # Every surface voxel of one box is at most 3 voxels from the other's surface; most are closer.
    assert 1.0 <= hd95(shifted, ref) <= 3.0
    assert hd95(shifted, ref, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2 * hd95(shifted, ref))
    assert hd95(np.zeros_like(ref), np.zeros_like(ref)) == 0.0
    assert np.isnan(hd95(np.zeros_like(ref), ref))
    assert hd95(ref, np.zeros_like(ref), empty_value=373.13) == 373.13
    far = np.zeros_like(ref)
    far[0, 0, 0] = True  # one stray voxel far away barely moves the 95th percentile
    assert hd95(ref | far, ref) < 1.0
    with pytest.raises(ValueError, match="spacing"):
        hd95(ref, ref, spacing=(1.0, 0.0, 1.0))
