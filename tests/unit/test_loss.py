"""OSS-Net loss: hand-computed values, the alpha = 0 / no-head cases, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from ossnet.loss import LossTerms, ossnet_loss


def bce(logit: float, label: float) -> float:
    """Binary cross-entropy of one logit, written out: -[y log s(x) + (1 - y) log(1 - s(x))]."""
    s = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(s) + (1 - label) * math.log(1 - s))


def test_matches_hand_computation() -> None:
    point_logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, -0.5, 0.25]])
    point_labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    lowres_logits = torch.tensor([-1.0, 1.0, 0.5, -2.0]).reshape(1, 1, 2, 2, 1).repeat(2, 1, 1, 1, 1)
    lowres_logits[1] *= -1
    lowres_labels = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 2, 1).repeat(2, 1, 1, 1)
    terms = ossnet_loss(point_logits, point_labels, lowres_logits, lowres_labels, alpha=0.1)
    expected_point = (
        bce(0.0, 1) + bce(2.0, 0) + bce(-1.0, 0) + bce(3.0, 1) + bce(-0.5, 1) + bce(0.25, 0)
    ) / 6
    expected_aux = (
        bce(-1.0, 1) + bce(1.0, 1) + bce(0.5, 0) + bce(-2.0, 0)  # volume 0
        + bce(1.0, 1) + bce(-1.0, 1) + bce(-0.5, 0) + bce(2.0, 0)  # volume 1: logits negated
    ) / 8
    assert isinstance(terms, LossTerms)
    assert terms.point.item() == pytest.approx(expected_point, rel=1e-6)
    assert terms.aux.item() == pytest.approx(expected_aux, rel=1e-6)
    assert terms.total.item() == pytest.approx(expected_point + 0.1 * expected_aux, rel=1e-6)
    # Spot-check the helper itself: BCE(0, 1) = log 2.
    assert bce(0.0, 1) == pytest.approx(math.log(2.0))


def test_global_mean_equals_paper_per_volume_average() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    labels = (torch.rand(3, 7, generator=g) > 0.5).float()
    lowres = torch.randn(3, 1, 3, 1, 2, generator=g)
    lowres_labels = (torch.rand(3, 3, 1, 2, generator=g) > 0.5).float()
    alpha = 0.25
    per_volume = [
        ossnet_loss(logits[i : i + 1], labels[i : i + 1], lowres[i : i + 1], lowres_labels[i : i + 1], alpha).total
        for i in range(3)
    ]
    total = ossnet_loss(logits, labels, lowres, lowres_labels, alpha).total
    assert total.item() == pytest.approx(torch.stack(per_volume).mean().item(), rel=1e-6)


def test_no_head_gives_zero_aux() -> None:
    logits = torch.tensor([[1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0]])
    terms = ossnet_loss(logits, labels, None, None, alpha=0.1)
    assert terms.aux.item() == 0.0
    assert terms.total.item() == pytest.approx(bce(1.0, 1), rel=1e-6)
    assert torch.equal(terms.total, terms.point)


def test_alpha_zero_keeps_head_in_graph_with_zero_gradient() -> None:
    logits = torch.tensor([[0.5, -0.5]], requires_grad=True)
    lowres = torch.tensor([1.0, -1.0]).reshape(1, 1, 2, 1, 1).requires_grad_()
    terms = ossnet_loss(logits, torch.tensor([[1.0, 0.0]]), lowres, None, alpha=0.0)
    assert terms.aux.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.point.item())
    terms.total.backward()
    # DDP needs a gradient (even zero) for every parameter that took part in forward.
    assert lowres.grad is not None and torch.equal(lowres.grad, torch.zeros_like(lowres))
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_integer_labels_are_accepted() -> None:
    logits = torch.tensor([[0.0, 2.0]])
    lowres = torch.zeros(1, 1, 1, 1, 2)
    labels = torch.tensor([[1, 0]], dtype=torch.uint8)
    terms = ossnet_loss(logits, labels, lowres, torch.ones(1, 1, 1, 2, dtype=torch.uint8), 0.1)
    assert terms.aux.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_bad_inputs_raise() -> None:
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="labels"):
        ossnet_loss(logits, torch.zeros(2, 5), None, None, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        ossnet_loss(logits, torch.zeros(2, 4), None, None, -0.1)
    lowres = torch.zeros(2, 1, 3, 3, 2)
    with pytest.raises(ValueError, match="label_lowres"):
        ossnet_loss(logits, torch.zeros(2, 4), lowres, None, 0.1)
    with pytest.raises(ValueError, match="label_lowres"):
        ossnet_loss(logits, torch.zeros(2, 4), lowres, torch.zeros(2, 3, 3, 3), 0.1)
