"""Single-process training primitives: optimizer, scheduler, one step, one epoch, evaluation.

Distributed drivers (Ray Train) wrap these unchanged: ``train_step`` calls ``model(...)``, so a
``DistributedDataParallel`` wrapper sees every forward pass and synchronises gradients.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import MultiStepLR

from ossnet.config import OPTIMIZERS
from ossnet.loss import LossTerms, ossnet_loss
from ossnet.targets import TargetSpec

logger = logging.getLogger(__name__)



class Lookahead(Optimizer):
    """Lookahead (Zhang et al., 2019) around any base optimizer.

    Every ``k`` base steps the slow weights move ``alpha`` of the way towards the fast weights and
    the fast weights restart from there. The slow weights start at the parameters' values before
    the first step. ``param_groups`` is the base optimizer's own list, so LR schedulers and
    ``GradScaler.unscale_`` act on the base optimizer through this wrapper.

    Args:
        base: the inner ("fast") optimizer.
        k: base steps between synchronisations (>= 1).
        alpha: slow-weight step size in (0, 1].
    """

    def __init__(self, base: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if k < 1:
            raise ValueError(f"lookahead k: must be >= 1, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"lookahead alpha: must be in (0, 1], got {alpha}")
        # The base class sets up hooks and step patching; its throwaway group is replaced below.
        super().__init__([p for g in base.param_groups for p in g["params"]], {})
        self.base = base
        self.k = k
        self.alpha = alpha
        self.fast_steps = 0
        self.param_groups = base.param_groups
        self.defaults = base.defaults

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One base step; every ``k``-th also interpolates slow weights and resets fast weights."""
        for p in self._params():
            if p not in self.state:
                self.state[p]["slow"] = p.detach().clone()
        loss = self.base.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for p in self._params():
                slow = self.state[p]["slow"]
                slow.lerp_(p, self.alpha)
                p.copy_(slow)
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base": base state dict, "lookahead": {fast_steps, k, alpha, slow: {index: tensor}}}``."""
        slow = {i: self.state[p]["slow"] for i, p in enumerate(self._params()) if p in self.state}
        return {
            "base": self.base.state_dict(),
            "lookahead": {"fast_steps": self.fast_steps, "k": self.k, "alpha": self.alpha, "slow": slow},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a ``state_dict``; ``k`` and ``alpha`` stay as constructed."""
        if "base" not in state_dict or "lookahead" not in state_dict:
            raise ValueError("optimizer state: not a Lookahead state dict (needs 'base' and 'lookahead')")
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups  # the base rebuilt its groups
        saved = state_dict["lookahead"]
        params = self._params()
        self.fast_steps = int(saved["fast_steps"])
        self.state = defaultdict(dict)
        for index, tensor in saved["slow"].items():
            if not 0 <= int(index) < len(params):
                raise ValueError(f"optimizer state: slow weight index {index} out of range ({len(params)} params)")
            p = params[int(index)]
            self.state[p]["slow"] = tensor.to(device=p.device, dtype=p.dtype).clone()


def make_optimizer(model: nn.Module, name: str = "radam_lookahead", lr: float = 3e-4) -> Optimizer:
    """Optimizer over the trainable parameters (no weight decay, as in the paper).

    Args:
        model: the network (bare or DDP-wrapped).
        name: "radam_lookahead" (paper: Lookahead(RAdam), k=5, alpha=0.5), "radam" or "adam".
        lr: learning rate (paper: 3e-4).
    """
    if lr <= 0:
        raise ValueError(f"optimizer.lr: must be > 0, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr)
    if name == "radam_lookahead":
        return Lookahead(torch.optim.RAdam(params, lr=lr), k=5, alpha=0.5)
    raise ValueError(f"optimizer.name: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer: Optimizer, milestones: Sequence[int] = (20, 30), gamma: float = 0.1) -> MultiStepLR:
    """Step decay by ``gamma`` at each epoch milestone; call ``.step()`` once per epoch."""
    ms = [int(m) for m in milestones]
    if any(m < 1 for m in ms) or ms != sorted(set(ms)):
        raise ValueError(f"scheduler.milestones: need strictly increasing positive epochs, got {list(milestones)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"scheduler.gamma: must be in (0, 1], got {gamma}")
    return MultiStepLR(optimizer, milestones=ms, gamma=gamma)


def batch_to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
    """Move a training batch to ``device``.

    NumPy arrays become tensors; floating arrays become float32 (the store may hold float16);
    values that are neither arrays nor tensors (e.g. case ids) are dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            logger.debug("batch_to_device: dropping non-array key %r", key)
            continue
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        out[key] = value.to(device, non_blocking=True)
    return out


def _require(batch: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in batch:
        raise KeyError(f"batch: missing key {key!r} (have {sorted(batch)})")
    return batch[key]


def _targets(model: nn.Module) -> TargetSpec:
    config = getattr(getattr(model, "module", model), "config", None)
    return config.targets if config is not None else TargetSpec()


def _forward_loss(
    model: nn.Module, batch: Mapping[str, Tensor], alpha: float, amp: bool, weights: Sequence[float] | None = None
) -> tuple[LossTerms, Tensor, Tensor | None]:
    """Forward pass (optionally under fp16 autocast) and loss in float32."""
    image = _require(batch, "image_lowres")
    points = _require(batch, "points")
    labels = _require(batch, "labels")
    with torch.autocast(device_type=points.device.type, dtype=torch.float16, enabled=amp):
        point_logits, lowres_logits = model(image, points, batch.get("patches"))
    point_logits = point_logits.float()
    lowres_logits = lowres_logits.float() if lowres_logits is not None else None
    terms = ossnet_loss(point_logits, labels, lowres_logits, batch.get("label_lowres"), alpha,
                        kind=_targets(model).kind, weights=weights)
    return terms, point_logits, lowres_logits


@torch.no_grad()
def _metrics(
    terms: LossTerms, point_logits: Tensor, labels: Tensor, lowres_logits: Tensor | None, label_lowres: Tensor | None,
    targets: TargetSpec | None = None,
) -> dict[str, float]:
    """Scalar metrics, fetched from the device in one transfer. Multi-target models add
    ``points_<target>``: the mean number of a volume's training points inside each target."""
    targets = targets or TargetSpec()
    classes = targets.kind == "classes"
    names = ["loss", "point_loss", "aux_loss", "point_acc"]
    values = [
        terms.total.detach(),
        terms.point.detach(),
        terms.aux.detach(),
        (point_logits.argmax(-1) == labels).float().mean() if classes
        else ((point_logits > 0) == (labels > 0.5)).float().mean(),
    ]
    if targets.kind != "binary":
        if classes:
            member = torch.as_tensor(targets.class_regions(), device=labels.device)
            inside = member[labels.long()]  # [B, N, T]
        else:
            inside = (labels > 0.5).float().reshape(*labels.shape[:2], -1)
        names += [f"points_{name}" for name in targets.names]
        values += list(inside.sum(dim=1).mean(dim=0).unbind(0))
    if lowres_logits is not None and label_lowres is not None:
        pred = (lowres_logits.squeeze(1) if lowres_logits.shape[1] == 1 else lowres_logits) > 0
        ref = label_lowres > 0.5
        denom = (pred.sum() + ref.sum()).float()
        inter = (pred & ref).sum().float()
        # Both empty counts as perfect agreement.
        names.append("lowres_dice")
        values.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)))
    return dict(zip(names, torch.stack([v.float() for v in values]).tolist()))


def train_step(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    optimizer: Optimizer,
    alpha: float,
    scaler: torch.amp.GradScaler | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """One optimisation step on a batch already on the model's device.

    Args:
        model: ``OSSNet`` or a DDP wrapper of it.
        batch: ``image_lowres [B, C, *lowres]``, ``points [B, N, 3]``, ``labels [B, N]``,
            optional ``patches [B, N, Cp, k, k, k]`` and ``label_lowres [B, *latent_shape]``.
        optimizer: from ``make_optimizer``.
        alpha: auxiliary loss weight.
        scaler: enabled GradScaler for mixed precision; fp16 autocast is used on CUDA only.
        weights: per-output loss weights of a multi-target model (``ossnet.loss.ossnet_loss``).

    Returns:
        ``loss``, ``point_loss``, ``aux_loss``, ``point_acc``, with a low-res head ``lowres_dice``,
        and for several targets ``points_<target>``.

    Raises:
        FloatingPointError: non-finite loss without a scaler (with one, the scaler skips the step).
            Parameters are left unchanged, but batch-norm running statistics have seen the batch.
    """
    model.train()
    use_scaler = scaler is not None and scaler.is_enabled()
    amp = use_scaler and _require(batch, "points").device.type == "cuda"
    terms, point_logits, lowres_logits = _forward_loss(model, batch, alpha, amp, weights)
    optimizer.zero_grad(set_to_none=True)
    if use_scaler:
        assert scaler is not None
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        if not torch.isfinite(terms.total):
            raise FloatingPointError(f"training loss is not finite ({terms.total.item()}); step skipped")
        terms.total.backward()
        optimizer.step()
    return _metrics(terms, point_logits, batch["labels"], lowres_logits, batch.get("label_lowres"), _targets(model))


def train_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    optimizer: Optimizer,
    alpha: float,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Run ``train_step`` over every batch; metrics are means weighted by volumes per batch.

    Returns:
        The ``train_step`` metrics averaged over the epoch, plus ``n_batches`` and ``n_volumes``.
    """
    sums: dict[str, float] = defaultdict(float)
    n_volumes = n_batches = 0
    for raw in batches:
        batch = batch_to_device(raw, device)
        size = int(_require(batch, "points").shape[0])
        for key, value in train_step(model, batch, optimizer, alpha, scaler, weights).items():
            sums[key] += value * size
        n_volumes += size
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches: the epoch yielded no batches")
    out = {key: value / n_volumes for key, value in sums.items()}
    out.update(n_batches=float(n_batches), n_volumes=float(n_volumes))
    return out


def evaluate_batch(
    model: nn.Module, batch: Mapping[str, Tensor], alpha: float, weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Loss and metrics of a batch in eval mode without gradients (validation).

    The model's train/eval mode is restored afterwards. Returns the ``train_step`` keys.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            terms, point_logits, lowres_logits = _forward_loss(model, batch, alpha, amp=False, weights=weights)
            return _metrics(terms, point_logits, batch["labels"], lowres_logits, batch.get("label_lowres"),
                            _targets(model))
    finally:
        model.train(was_training)


__all__ = [
    "Lookahead",
    "OPTIMIZERS",
    "batch_to_device",
    "evaluate_batch",
    "make_optimizer",
    "make_scheduler",
    "train_epoch",
    "train_step",
]
