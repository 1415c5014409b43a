"""One ``ossnet_bench.paper`` run: train one model for a fixed number of optimizer steps on the hard
phantoms, then segment the test cases densely at full resolution and score them.

Runs in a fresh process per (model, seed) (``python -m ossnet_bench.paper --worker``), so its peak
memory is its own. Every model gets the same cases, the same optimizer (the project's
Lookahead(RAdam), LR dropped x0.1 at 80% of the steps) and the same number of steps:

* OSS-Net variants (``onet``, ``A``..``D``, ``C_border``): ``batch`` volumes per step, each with
  ``n_points`` sampled points (uniform; ``C_border`` half from the border band), the paper's
  loss (point BCE + 0.1 x low-res BCE for C and D). Inference: MISE at full resolution (started
  from the low-res head for C and D), 2**14 points per decoder pass.
* ``unet3d``: the 3D residual U-Net on ``batch`` whole volumes per step (the paper's baseline).
* ``unet3d_patch``: the same U-Net on ``batch`` random crops per step (a third centred on
  foreground, as nnU-Net), the crop chosen so its training memory matches OSS-Net C's;
  inference by a sliding window (half overlap) with Gaussian blending.
* ``unet2d``: the 2D residual U-Net on ``slice_batch`` slices per step (a third through
  foreground), along one axis; inference slice by slice.

U-Nets are trained with BCE + soft Dice (what nnU-Net and MONAI users train with). With
``augment`` every model sees the paper's augmentation (flip, brightness, noise) per sample.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from ossnet_bench._common import PeakRSS

log = logging.getLogger("ossnet_bench.paper")


class TrainMemory:
    """Peak training memory in MiB above the level at entry: RSS on the CPU (``PeakRSS``),
    ``max_memory_allocated`` on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.delta_mb = 0.0
        self._rss = PeakRSS()
        self._before = 0

    def __enter__(self) -> "TrainMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._rss.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.delta_mb = (torch.cuda.max_memory_allocated() - self._before) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.delta_mb = self._rss.delta_mb

OSSNET_RUNS: dict[str, tuple[str, float]] = {  # run -> (variant, border ratio)
    "onet": ("onet", 0.0), "A": ("A", 0.0), "B": ("B", 0.0), "C": ("C", 0.0), "D": ("D", 0.0),
    "C_border": ("C", 0.5),
}
UNET_RUNS: tuple[str, ...] = ("unet3d", "unet2d", "unet3d_patch")
ZSCORE_MASK = {"brats": "nonzero", "lits": "all", "head": "all"}
DATA_SEED = 2021  # the cases; the run seed only drives initialisation and sampling


def load_cases(plan: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[Any], tuple[float, ...]]:
    """The plan's cases, z-scored per channel: ``(id, image (C, X, Y, Z), label)`` for training,
    the raw test cases, and the voxel spacing (mm)."""
    from ossnet.phantoms import phantom_dataset
    from ossnet.preprocess import zscore_channels

    cases = phantom_dataset(plan["dataset"], plan["n_train"] + plan["n_test"], shape=tuple(plan["shape"]),
                            seed=DATA_SEED, level="hard")
    normalised = [(c.case_id, zscore_channels(c.image, ZSCORE_MASK[plan["dataset"]])[0], c.label) for c in cases]
    spacing = tuple(float(s) for s in np.diag(cases[0].affine)[:3])
    return normalised, cases[plan["n_train"]:], spacing


def _fit(plan: dict[str, Any], model: Any, step: Callable[[Any], None]) -> dict[str, Any]:
    """Train ``model``: ``step(optimizer)`` ``plan["steps"]`` times with the project's
    Lookahead(RAdam), the LR dropped x0.1 at 80% of the steps.

    Returns:
        ``train_mb`` (peak above the level at entry), ``train_s`` and ``params``.
    """
    from ossnet.training import make_optimizer

    optimizer = make_optimizer(model, "radam_lookahead", float(plan["lr"]))
    drop_at = int(0.8 * int(plan["steps"]))
    with TrainMemory(plan["device"]) as meter:
        start = time.perf_counter()
        for i in range(int(plan["steps"])):
            if i == drop_at:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            step(optimizer)
        seconds = time.perf_counter() - start
    return {"train_mb": meter.delta_mb, "train_s": seconds, "params": sum(p.numel() for p in model.parameters())}


def _voxel_step(model: Any, optimizer: Any, images: list[np.ndarray], labels: list[np.ndarray], device: str) -> None:
    """One BCE + soft Dice step of a voxel network on stacked ``images`` ``[B, C, ...]``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.stack(images), dtype=np.float32)).to(device)
    y = torch.from_numpy(np.stack(labels).astype(np.float32))[:, None].to(device)
    optimizer.zero_grad(set_to_none=True)
    _dice_bce(model(x), y).backward()
    optimizer.step()


def _segment(test: list, predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """``predict`` (image -> bool mask) over the test cases, timed per case."""
    masks, seconds = [], []
    for _, image, _ in test:
        start = time.perf_counter()
        masks.append(predict(image))
        seconds.append(time.perf_counter() - start)
    return {"masks": masks, "infer_s": seconds}


def _dice_bce(logits: Any, target: Any) -> Any:
    """BCE + soft Dice over the batch, on ``[B, 1, ...]`` logits."""
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    soft_dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice


def _augment(plan: dict[str, Any], image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """The paper's augmentation of one sample (or none), for the voxel baselines."""
    from ossnet.augment import apply_augment, sample_augment_params
    from ossnet.config import AugmentConfig

    if not plan["augment"]:
        return image, label
    params = sample_augment_params(AugmentConfig(), image, rng)
    image, label, _, _ = apply_augment(params, image, label)
    return image, label


# --------------------------------------------------------------------------- OSS-Net


def _ossnet(run: str, plan: dict[str, Any], train: list, test: list, rng: np.random.Generator) -> dict[str, Any]:
    from ossnet.config import AugmentConfig, SamplingConfig, model_config
    from ossnet.inference import Inferer
    from ossnet.model import build_model
    from ossnet.sampling import training_sample
    from ossnet.training import batch_to_device, train_step
    from ossnet_pipelines.data import collate_rows

    variant, border = OSSNET_RUNS[run]
    channels = train[0][1].shape[0]
    device = plan["device"]
    cfg = model_config(variant, plan["preset"], volume_shape=tuple(plan["shape"]), in_channels=channels)
    model = build_model(cfg).to(device)
    sampling = SamplingConfig(n_points=int(plan["n_points"]), border_ratio=border)
    augment = AugmentConfig() if plan["augment"] else AugmentConfig.off()
    alpha = 0.1 if cfg.has_lowres_head else 0.0

    def step(optimizer: Any) -> None:
        picks = rng.integers(0, len(train), int(plan["batch"]))
        rows = [training_sample(train[i][1], train[i][2], cfg, sampling, augment, rng) for i in picks]
        train_step(model, batch_to_device(collate_rows(rows), device), optimizer, alpha)

    out = _fit(plan, model, step)
    inferer = Inferer(mode="mise_lowres" if cfg.has_lowres_head else "mise", chunk_points=2**14, device=device)
    results = [inferer(model, image) for _, image, _ in test]
    return {**out, "masks": [np.asarray(r.mask) for r in results], "infer_s": [r.seconds for r in results],
            "queries": [r.n_queries for r in results]}


# --------------------------------------------------------------------------- U-Nets


def _unet3d(run: str, plan: dict[str, Any], train: list, test: list, rng: np.random.Generator) -> dict[str, Any]:
    import torch

    from ossnet.baselines import ResidualUNet3D
    from ossnet.baselines.patches import random_crop_starts, sliding_window_predict

    device = plan["device"]
    channels = train[0][1].shape[0]
    model = ResidualUNet3D(channels, 1, channels=tuple(plan["unet_channels"])).to(device)
    shape = tuple(plan["shape"])
    crop = tuple(min(int(plan["crop"]), s) for s in shape) if run == "unet3d_patch" else None

    def step(optimizer: Any) -> None:
        images, labels = [], []
        for i in rng.integers(0, len(train), int(plan["batch"])):
            image, label = _augment(plan, train[i][1], train[i][2], rng)
            if crop is not None:
                (a, b, c), = random_crop_starts(shape, crop, label, 1, rng, foreground_fraction=1 / 3)
                window = (slice(a, a + crop[0]), slice(b, b + crop[1]), slice(c, c + crop[2]))
                image, label = image[(slice(None),) + window], label[window]
            images.append(image)
            labels.append(label > 0)
        _voxel_step(model, optimizer, images, labels, device)

    def predict(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            if crop is None:
                logits = model(torch.from_numpy(image)[None].to(device))[0].cpu()
            else:
                logits = sliding_window_predict(model, image, crop, overlap=0.5, batch_size=int(plan["batch"]))
        return (logits[0] > 0).numpy()

    out = _fit(plan, model, step)
    model.eval()
    return {**out, **_segment(test, predict), "queries": [int(np.prod(shape))] * len(test),
            "crop": list(crop) if crop is not None else None}


def _unet2d(run: str, plan: dict[str, Any], train: list, test: list, rng: np.random.Generator) -> dict[str, Any]:

    from ossnet.baselines import ResidualUNet2D, predict_volume_slicewise

    axis, device = int(plan["axis"]), plan["device"]
    channels = train[0][1].shape[0]
    model = ResidualUNet2D(channels, 1, channels=tuple(plan["unet_channels"])).to(device)

    def step(optimizer: Any) -> None:
        images, labels = [], []
        for k, i in enumerate(rng.integers(0, len(train), int(plan["slice_batch"]))):
            image, label = _augment(plan, train[i][1], train[i][2], rng)
            depth = label.shape[axis]
            through = np.flatnonzero(np.moveaxis(label > 0, axis, 0).reshape(depth, -1).any(axis=1))
            # A third of the slices pass through foreground (nnU-Net's oversampling).
            index = int(rng.choice(through)) if (k % 3 == 0 and through.size) else int(rng.integers(depth))
            images.append(np.take(image, index, axis=axis + 1))
            labels.append(np.take(label, index, axis=axis) > 0)
        _voxel_step(model, optimizer, images, labels, device)

    def predict(image: np.ndarray) -> np.ndarray:
        return (predict_volume_slicewise(model, image, axis, batch_size=int(plan["slice_batch"]))[0] > 0).numpy()

    out = _fit(plan, model, step)
    return {**out, **_segment(test, predict), "queries": [int(np.prod(plan["shape"]))] * len(test), "axis": axis}


def run_one(payload: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (model, seed) of a plan; per-case Dice, IoU, HD95 and timings."""
    import torch

    from ossnet.metrics import dice, hd95, iou

    torch.set_num_threads(int(payload.get("threads") or 1))
    plan, run, seed = payload["plan"], payload["run"], int(payload["seed"])
    cases, test_raw, spacing = load_cases(plan)
    train, test = cases[: plan["n_train"]], cases[plan["n_train"]:]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    log.info("%s seed %d: training %d steps", run, seed, plan["steps"])
    if run in OSSNET_RUNS:
        out = _ossnet(run, plan, train, test, rng)
    elif run == "unet2d":
        out = _unet2d(run, plan, train, test, rng)
    elif run in UNET_RUNS:
        out = _unet3d(run, plan, train, test, rng)
    else:
        raise ValueError(f"run: unknown model {run!r}")
    # A prediction that misses the target entirely scores the grid diagonal (BraTS-style).
    diagonal = float(np.linalg.norm(np.asarray(plan["shape"]) * np.asarray(spacing)))
    masks = out.pop("masks")
    scores = {
        "dice": [dice(m, c.label) for m, c in zip(masks, test_raw)],
        "iou": [iou(m, c.label) for m, c in zip(masks, test_raw)],
        "hd95": [hd95(m, c.label, spacing, empty_value=diagonal) for m, c in zip(masks, test_raw)],
    }
    log.info("%s seed %d: test Dice %.4f, %.0f s training, %.0f MiB", run, seed, float(np.mean(scores["dice"])),
             out["train_s"], out["train_mb"])
    return {"run": run, "seed": seed, **scores, **out}


__all__ = ["DATA_SEED", "OSSNET_RUNS", "TrainMemory", "UNET_RUNS", "load_cases", "run_one"]
