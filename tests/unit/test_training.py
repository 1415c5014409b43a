"""Training primitives: optimisers (Lookahead), scheduler, train_step/epoch, evaluation, DDP."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from ossnet.config import ModelConfig, model_config
from ossnet.model import build_model
from ossnet.training import (
    Lookahead,
    batch_to_device,
    evaluate_batch,
    make_optimizer,
    make_scheduler,
    train_epoch,
    train_step,
)

# A small odd grid keeps CPU steps fast; the model tests cover 37x41x29.
ODD_SHAPE = (19, 23, 13)


def tiny_config(variant: str) -> ModelConfig:
    return model_config(variant, "tiny", volume_shape=ODD_SHAPE)


def make_batch(cfg: ModelConfig, b: int = 2, n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch whose labels are learnable (a half-space of the normalised points)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(b, n, 3, generator=g) * 2 - 1
    batch = {
        "image_lowres": torch.randn(b, cfg.encoder.in_channels, *cfg.lowres_input_shape, generator=g),
        "points": points,
        "labels": (points[..., 0] + 0.5 * points[..., 1] > 0).float(),
        "label_lowres": (torch.rand(b, *cfg.latent_shape, generator=g) > 0.6).float(),
    }
    if cfg.patch.enabled:
        k = cfg.patch.size
        batch["patches"] = torch.randn(b, n, cfg.patch_channels, k, k, k, generator=g)
    return batch


@pytest.mark.parametrize(("variant", "optimizer", "lr"), [("C", "adam", 3e-3), ("A", "radam_lookahead", 1e-2)])
def test_train_step_reduces_loss_on_a_fixed_batch(variant: str, optimizer: str, lr: float) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    model = build_model(cfg)
    batch = make_batch(cfg)
    opt = make_optimizer(model, optimizer, lr=lr)
    history = [train_step(model, batch, opt, alpha=0.1) for _ in range(8)]
    first, last = history[0], history[-1]
    assert set(first) >= {"loss", "point_loss", "aux_loss", "point_acc"}
    assert ("lowres_dice" in first) == cfg.has_lowres_head
    assert all(isinstance(v, float) for v in first.values())
    assert last["loss"] < 0.8 * first["loss"], [h["loss"] for h in history]
    if cfg.has_lowres_head:
        assert first["loss"] == pytest.approx(first["point_loss"] + 0.1 * first["aux_loss"], rel=1e-5)
        assert last["aux_loss"] < first["aux_loss"]


def _quadratic_sgd_lookahead(k: int, alpha: float) -> tuple[torch.nn.Parameter, Lookahead]:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    return w, Lookahead(torch.optim.SGD([w], lr=0.1), k=k, alpha=alpha)


def _step(w: torch.nn.Parameter, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    (0.5 * w**2).sum().backward()  # gradient = w, so SGD multiplies w by 0.9
    opt.step()


def test_lookahead_interpolates_slow_weights_every_k_steps() -> None:
    w, opt = _quadratic_sgd_lookahead(k=2, alpha=0.5)
    _step(w, opt)
    assert w.item() == pytest.approx(0.9)
    _step(w, opt)  # fast 0.81; slow 1 + 0.5 * (0.81 - 1) = 0.905; fast reset to slow
    assert w.item() == pytest.approx(0.905)
    _step(w, opt)
    assert w.item() == pytest.approx(0.8145)
    _step(w, opt)  # fast 0.73305; slow 0.905 + 0.5 * (0.73305 - 0.905)
    assert w.item() == pytest.approx(0.819025)
    assert opt.fast_steps == 4


def test_lookahead_state_dict_round_trip_resumes_identically() -> None:
    torch.manual_seed(1)
    cfg = tiny_config("C")
    model_a = build_model(cfg)
    batch = make_batch(cfg, seed=3)
    opt_a = make_optimizer(model_a, "radam_lookahead", lr=1e-2)
    for _ in range(2):  # mid-cycle: 2 of k = 5 steps
        train_step(model_a, batch, opt_a, alpha=0.1)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model_b = build_model(cfg)
    model_b.load_state_dict(saved["model"])
    opt_b = make_optimizer(model_b, "radam_lookahead", lr=1e-2)
    opt_b.load_state_dict(saved["optimizer"])
    assert isinstance(opt_b, Lookahead) and opt_b.fast_steps == 2
    for _ in range(4):  # crosses the synchronisation after step 5
        train_step(model_a, batch, opt_a, alpha=0.1)
        train_step(model_b, batch, opt_b, alpha=0.1)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_lookahead_rejects_foreign_state_and_bad_arguments() -> None:
    w, opt = _quadratic_sgd_lookahead(k=5, alpha=0.5)
    with pytest.raises(ValueError, match="Lookahead"):
        opt.load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())
    with pytest.raises(ValueError, match="k"):
        Lookahead(torch.optim.SGD([w], lr=0.1), k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD([w], lr=0.1), alpha=1.5)


def test_scheduler_decays_base_lr_through_lookahead() -> None:
    model = nn.Linear(3, 1)
    opt = make_optimizer(model, "radam_lookahead", lr=3e-4)
    sched = make_scheduler(opt)
    assert isinstance(opt, Lookahead)
    lrs = []
    for _ in range(32):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        sched.step()
        lrs.append(opt.base.param_groups[0]["lr"])
    assert lrs[18] == pytest.approx(3e-4)
    assert lrs[19] == pytest.approx(3e-5)  # after 20 epochs
    assert lrs[29] == pytest.approx(3e-6)  # after 30 epochs


def test_factories_validate_arguments() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="optimizer.name"):
        make_optimizer(model, "sgd")
    with pytest.raises(ValueError, match="optimizer.lr"):
        make_optimizer(model, "adam", lr=0.0)
    assert type(make_optimizer(model, "radam")) is torch.optim.RAdam
    with pytest.raises(ValueError, match="milestones"):
        make_scheduler(make_optimizer(model, "adam"), milestones=(30, 20))


def test_batch_to_device_converts_arrays() -> None:
    raw = {
        "image_lowres": np.ones((1, 2, 3, 3, 3), dtype=np.float16),
        "points": torch.zeros(1, 4, 3, dtype=torch.float64),
        "labels": np.array([[1, 0, 1, 0]], dtype=np.uint8),
        "case_id": ["case-001"],
    }
    out = batch_to_device(raw, "cpu")
    assert set(out) == {"image_lowres", "points", "labels"}
    assert out["image_lowres"].dtype == torch.float32 and out["points"].dtype == torch.float32
    assert out["labels"].dtype == torch.uint8


def test_train_epoch_averages_over_batches() -> None:
    torch.manual_seed(2)
    cfg = tiny_config("B")
    model = build_model(cfg)
    batches = [{k: v.numpy() for k, v in make_batch(cfg, b=b, n=8, seed=s).items()} for s, b in ((0, 2), (1, 3))]
    opt = make_optimizer(model, "adam", lr=1e-3)
    out = train_epoch(model, batches, opt, alpha=0.1, device="cpu")
    assert out["n_batches"] == 2.0 and out["n_volumes"] == 5.0
    assert 0.0 <= out["point_acc"] <= 1.0 and out["loss"] > 0
    with pytest.raises(ValueError, match="no batches"):
        train_epoch(model, [], opt, alpha=0.1, device="cpu")


class _FixedOutput(nn.Module):
    """Returns preset logits; one parameter so optimisers have something to hold."""

    def __init__(self, point_logits: torch.Tensor, lowres_logits: torch.Tensor | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.point_logits = point_logits
        self.lowres_logits = lowres_logits

    def forward(self, image, points, patches):  # noqa: ANN001, ANN201 - mirrors OSSNet.forward
        lowres = None if self.lowres_logits is None else self.lowres_logits * self.scale
        return self.point_logits * self.scale, lowres


def test_evaluate_batch_metrics_by_hand_and_restores_mode() -> None:
    point_logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    lowres_logits = torch.tensor([1.0, 1.0, -1.0, 1.0]).reshape(1, 1, 2, 2, 1)
    model = _FixedOutput(point_logits, lowres_logits)
    batch = {
        "image_lowres": torch.zeros(1, 1, 2, 2, 2),
        "points": torch.zeros(1, 4, 3),
        "labels": torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        "label_lowres": torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 2, 2, 1),
    }
    out = evaluate_batch(model, batch, alpha=0.1)
    assert out["point_acc"] == pytest.approx(0.75)  # the 0.5 logit on a 0 label is wrong
    # predicted {0, 1, 3}, reference {0, 2, 3}: Dice = 2 * 2 / (3 + 3)
    assert out["lowres_dice"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(out["point_loss"] + 0.1 * out["aux_loss"], rel=1e-6)
    assert model.scale.grad is None and model.training
    model.eval()
    evaluate_batch(model, batch, alpha=0.1)
    assert not model.training
    empty = {**batch, "label_lowres": torch.zeros(1, 2, 2, 1)}
    assert evaluate_batch(_FixedOutput(point_logits, -lowres_logits.abs()), empty, 0.1)["lowres_dice"] == 1.0


def test_train_step_rejects_non_finite_loss_and_missing_keys() -> None:
    cfg = tiny_config("onet")
    model = build_model(cfg)
    opt = make_optimizer(model, "adam")
    batch = make_batch(cfg)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="not finite"):
        train_step(model, {**batch, "image_lowres": batch["image_lowres"] * float("nan")}, opt, 0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)
    with pytest.raises(KeyError, match="labels"):
        train_step(model, {k: v for k, v in batch.items() if k != "labels"}, opt, 0.1)


def test_train_step_with_grad_scaler_and_lookahead() -> None:
    torch.manual_seed(3)
    cfg = tiny_config("D")
    model = build_model(cfg)
    opt = make_optimizer(model, "radam_lookahead", lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batch = make_batch(cfg)
    start = model.decoder.fc_out.weight.detach().clone()
    losses = [train_step(model, batch, opt, 0.1, scaler=scaler)["loss"] for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not torch.equal(start, model.decoder.fc_out.weight)
    assert opt.fast_steps == 5


def test_train_step_through_ddp_wrapper(tmp_path: Path) -> None:
    """A one-process gloo group: train_step must go through DDP's forward (no unused parameters)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(4)
        cfg = tiny_config("C")
        ddp = nn.parallel.DistributedDataParallel(build_model(cfg))
        opt = make_optimizer(ddp, "radam_lookahead", lr=1e-2)
        batch = make_batch(cfg)
        # alpha = 0 must still give the low-res head a gradient, or DDP fails on the next step.
        for alpha in (0.0, 0.0, 0.1):
            out = train_step(ddp, batch, opt, alpha=alpha)
            assert np.isfinite(out["loss"])
        assert evaluate_batch(ddp, batch, 0.1)["loss"] > 0
    finally:
        dist.destroy_process_group()


def test_validation_summary_reports_the_predicted_volume_ratio_and_collapse():
    from ossnet_pipelines.train.validation import collapse_message, summarize

    scores = [
        {"dice": 0.5, "iou": 0.4, "pred_voxels": 0, "ref_voxels": 300},
        {"dice": 1.0, "iou": 1.0, "pred_voxels": 0, "ref_voxels": 0},
    ]
    out = summarize(scores)
    assert out["val_dice"] == 0.75 and out["val_cases"] == 2 and out["val_pred_ratio"] == 0.0
    assert "no foreground predicted" in collapse_message(scores)
    scores[0]["pred_voxels"] = 290
    assert summarize(scores)["val_pred_ratio"] == pytest.approx(290 / 300)
    assert collapse_message(scores) is None
    assert "val_pred_ratio" not in summarize([scores[1]])  # no reference foreground: no ratio
