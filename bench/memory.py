"""Training-memory benchmark: OSS-Net variant C vs the 3D residual U-Net (paper Table 2).

``python -m ossnet_bench.memory [--quick] [--device all|cpu|cuda]``

Measures the peak memory of ONE training step at batch size 1 (forward, BCE loss, backward,
optimizer step) for

* OSS-Net variant C (``model_config("C", "brats", volume_shape=grid)``) with 2**14 query
  points and their 7**3 patches; the encoder sees the x2-downscaled volume;
* the 3D residual U-Net (base 16, two residual units per level: the paper's sizing, never
  widened) on the same full-resolution 4-channel volume,

at the BraTS grid 256x256x160 (``--quick``: 128x128x80) and at 1.5x per side. Batches are
synthetic tensors of the right shapes, built before the measurement starts, so both figures
are the memory the step itself needs (activations, gradients, optimizer state, temporaries).

Every configuration runs in its own subprocess (with ``--quick`` on the CPU, the two OSS-Net
runs and the U-Net probe run side by side with one thread each; the U-Net runs at the
reported sizes are always alone). On the CPU the figure is the peak RSS during
the step minus the RSS just before it (the kernel's exact high-water mark, reset through
/proc/self/clear_refs; a sampling thread where that is unsupported). On CUDA (when available)
it is ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory allocated
before the step. A U-Net size is measured only if an extrapolation from the smaller sizes
measured so far (probes at half, and in full mode a quarter, of the size per side come first)
fits the memory budget (``--max-ram-gb`` and the RAM available now on
the CPU, 90% of the card on CUDA), and the large U-Net only if its predicted step time also
fits ``--time-budget`` per device (60 s with ``--quick``: CPU steps at 192x192x120 take minutes). A U-Net
size not measured is reported as null and listed under ``skipped`` with the reason; its
extrapolation (``*_estimate`` keys, affine in the voxel count, fitted to the measured sizes)
is then used for the ratio, flagged by ``ratio_estimated`` / ``ratio_large_estimated``.

The crop-trained U-Net (nnU-Net and MONAI practice) is measured too: the largest cubic crop (a
multiple of 16) whose step the fitted U-Net memory puts at or under OSS-Net's, measured alone
(``unet3d_patch_crop``, ``unet3d_patch_train_peak_mb``): its memory is fixed by the crop, not by
the volume, so it is the baseline at equal training memory (``ossnet_bench.paper`` compares its Dice).

The last stdout line is one JSON object with ``ossnet_train_peak_mb``, ``unet3d_train_peak_mb``,
``ratio`` (U-Net / OSS-Net), the same three with ``_large``, the crop-trained U-Net's keys, and ``_cuda``-suffixed copies when
CUDA was measured too (the first measured device, named by ``device``, carries the plain
keys; CPU unless ``--device cuda``). Paper (GPU, BraTS size): OSS-Net C 2.59 GB vs 3D U-Net 14.41 GB.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ossnet_bench._common import (
    PeakRSS,
    emit_result,
    make_parser,
    mem_available_mb,
    round_mb,
    run_worker,
    serve_worker,
    setup_logging,
)

log = logging.getLogger("ossnet_bench.memory")

BRATS_SHAPE: tuple[int, int, int] = (256, 256, 160)
QUICK_SHAPE: tuple[int, int, int] = (128, 128, 80)
LARGE_FACTOR = 1.5
N_POINTS = 2**14
ALPHA = 0.1
# Extrapolated U-Net needs are multiplied by this before comparing them with the budget.
SAFETY = 1.15

Batch = dict[str, Any]


def scaled_shape(shape: Sequence[int], factor: float) -> tuple[int, int, int]:
    """``shape`` scaled per side and rounded to the nearest integer."""
    return tuple(max(2, int(round(s * factor))) for s in shape)  # type: ignore[return-value]


def _voxels(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


# --------------------------------------------------------------------------- worker side


def _make_optimizer(model: Any) -> tuple[Any, str]:
    """The project's training optimizer when available (same for both models), else Adam."""
    import torch

    try:
        from ossnet.training import make_optimizer
    except ImportError:
        return torch.optim.Adam(model.parameters(), lr=3e-4), "adam"
    return make_optimizer(model), "ossnet.training.make_optimizer"


StepFn = Callable[[Any, Batch, Any], None]


def _ossnet_setup(
    shape: tuple[int, int, int], n_points: int, device: str, preset: str = "brats", in_channels: int = 4, batch_size: int = 1
) -> tuple[Any, Batch, StepFn, str]:
    """OSS-Net C, a synthetic batch of ``batch_size`` volumes, and a one-step training function."""
    import torch
    import torch.nn.functional as F

    from ossnet.config import model_config
    from ossnet.model.network import build_model

    cfg = model_config("C", preset, volume_shape=shape, in_channels=in_channels)
    model = build_model(cfg).to(device)
    k, cp, b = cfg.patch.size, cfg.patch_channels, batch_size
    batch: Batch = {
        "image_lowres": torch.randn(b, cfg.encoder.in_channels, *cfg.lowres_input_shape, device=device),
        "points": torch.rand(b, n_points, 3, device=device) * 2 - 1,
        "patches": torch.randn(b, n_points, cp, k, k, k, device=device),
        "labels": (torch.rand(b, n_points, device=device) > 0.5).float(),
        "label_lowres": (torch.rand(b, *cfg.latent_shape, device=device) > 0.5).float(),
    }
    try:
        from ossnet.training import train_step
    except ImportError:
        train_step = None

    if train_step is not None:

        def step(m: Any, b: Batch, opt: Any) -> None:
            train_step(m, b, opt, ALPHA)

        return model, batch, step, "ossnet.training.train_step"

    def replicated(m: Any, b: Batch, opt: Any) -> None:
        opt.zero_grad(set_to_none=True)
        logits, lowres = m(b["image_lowres"], b["points"], b["patches"])
        loss = F.binary_cross_entropy_with_logits(logits, b["labels"])
        if lowres is not None:
            loss = loss + ALPHA * F.binary_cross_entropy_with_logits(lowres[:, 0], b["label_lowres"])
        loss.backward()
        opt.step()

    return model, batch, replicated, "replicated forward/BCE/backward/step"


def _unet_setup(
    shape: tuple[int, int, int], device: str, in_channels: int = 4, channels: Sequence[int] | None = None,
    batch_size: int = 1,
) -> tuple[Any, Batch, StepFn, str]:
    """The 3D residual U-Net (fairly sized unless ``channels`` says otherwise), a synthetic batch
    of ``batch_size`` volumes (or crops) of ``shape`` and a one-step function."""
    import torch
    import torch.nn.functional as F

    from ossnet.baselines.unet3d import DEFAULT_CHANNELS, ResidualUNet3D

    model = ResidualUNet3D(in_channels=in_channels, channels=tuple(channels or DEFAULT_CHANNELS)).to(device)
    batch: Batch = {
        "image": torch.randn(batch_size, in_channels, *shape, device=device),
        "label": (torch.rand(batch_size, 1, *shape, device=device) > 0.5).float(),
    }

    def step(m: Any, b: Batch, opt: Any) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(m(b["image"]), b["label"])
        loss.backward()
        opt.step()

    return model, batch, step, "forward/BCE/backward/step"


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Measure one training step in this (fresh) process; returns the figures as a dict."""
    import torch

    name, device = payload["model"], payload["device"]
    shape = tuple(int(s) for s in payload["shape"])
    if payload.get("threads"):  # several workers share the cores: oversubscribed OpenMP thrashes
        torch.set_num_threads(int(payload["threads"]))
    torch.manual_seed(int(payload.get("seed", 0)))
    in_channels, batch_size = int(payload.get("in_channels", 4)), int(payload.get("batch_size", 1))
    if name == "ossnet":
        model, batch, step, how = _ossnet_setup(  # type: ignore[arg-type]
            shape, int(payload["n_points"]), device, payload.get("preset", "brats"), in_channels, batch_size)
    elif name == "unet3d":
        model, batch, step, how = _unet_setup(  # type: ignore[arg-type]
            shape, device, in_channels, payload.get("channels"), batch_size)
    else:
        raise ValueError(f"payload.model: unknown {name!r}")
    model.train()
    optimizer, opt_name = _make_optimizer(model)
    n_params = sum(p.numel() for p in model.parameters())
    batch_mb = sum(t.numel() * t.element_size() for t in batch.values()) / 2**20
    gc.collect()
    label = f"{name} {'x'.join(map(str, shape))} on {device}"
    log.info("%s: %.2fM parameters, batch %.0f MiB; stepping", label, n_params / 1e6, batch_mb)
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, batch, optimizer)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        method = "cuda.max_memory_allocated"
        device_total_mb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
    else:
        with PeakRSS() as meter:
            step(model, batch, optimizer)
        peak_mb, method = meter.delta_mb, meter.method
        device_total_mb = None
    seconds = time.perf_counter() - start
    log.info("%s: peak %.0f MiB above baseline (%s), %.1f s", label, peak_mb, method, seconds)
    return {
        "peak_mb": peak_mb,
        "seconds": seconds,
        "params": n_params,
        "batch_mb": batch_mb,
        "method": method,
        "step": how,
        "optimizer": opt_name,
        "device_total_mb": device_total_mb,
    }


# --------------------------------------------------------------------------- driver side


def measure_peak(
    model: str, shape: tuple[int, int, int], device: str, n_points: int, timeout: float, threads: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One step of ``model`` measured in a fresh process; ``extra`` goes into the worker payload
    (``preset``, ``in_channels``, ``channels``, ``batch_size``)."""
    payload = {"model": model, "shape": list(shape), "device": device, "n_points": n_points, "seed": 0,
               "threads": threads, **extra}
    outcome = run_worker("ossnet_bench.memory", payload, timeout=timeout)
    if not outcome.ok:
        log.warning("%s %s on %s failed: %s", model, "x".join(map(str, shape)), device, outcome.error)
        return {"ok": False, "error": outcome.error}
    return {"ok": True, **outcome.result}


def _budget_mb(device: str, max_ram_mb: float, device_total_mb: float | None) -> float:
    """Memory a run may use: RAM (leaving 1 GiB to the machine) or 90% of the card."""
    if device == "cpu":
        return min(max_ram_mb, mem_available_mb() - 1024.0)
    # The card's size comes from a worker: querying it here would put a CUDA context in this
    # process and take memory from the workers.
    return 0.9 * device_total_mb if device_total_mb else math.inf


class UNetScaling:
    """Extrapolates the U-Net's peak memory and step time from the sizes measured so far.

    A dense CNN's training memory is affine in the voxel count (activations scale with it;
    weights, gradients and optimizer state do not), so two measured sizes fit it exactly; with
    one, a proportional estimate (an over-estimate, hence safe for gating) is used.
    """

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []  # (voxels, peak MiB, seconds)

    def add(self, shape: Sequence[int], peak_mb: float, seconds: float) -> None:
        self.points.append((_voxels(shape), float(peak_mb), float(seconds)))
        self.points.sort()

    def memory_mb(self, shape: Sequence[int]) -> float | None:
        if not self.points:
            return None
        v = _voxels(shape)
        if len(self.points) >= 2:
            (v1, p1, _), (v2, p2, _) = self.points[-2], self.points[-1]
            slope = (p2 - p1) / (v2 - v1) if v2 != v1 else 0.0
            if slope > 0:
                return p2 + slope * (v - v2)
        v_ref, p_ref, _ = self.points[-1]
        return p_ref * v / v_ref

    def describe(self) -> str:
        """How ``memory_mb`` extrapolates now (goes into the report next to each estimate)."""
        if len(self.points) >= 2:
            return "affine fit of the two largest measured sizes"
        if self.points:
            return "proportional to one measured size (an upper bound)"
        return "nothing measured"

    def seconds(self, shape: Sequence[int]) -> float | None:
        """Step time, proportional to the largest size timed alone (None if there is none)."""
        timed = [p for p in self.points if math.isfinite(p[2])]
        if not timed:
            return None
        v_ref, _, t_ref = timed[-1]
        return t_ref * _voxels(shape) / v_ref


def matching_crop(target_mb: float, scaling: UNetScaling, max_side: int, multiple: int = 16) -> int:
    """The largest cubic crop side (a multiple of ``multiple``, at least one multiple, at most
    ``max_side``) whose U-Net training step needs at most ``target_mb`` by ``scaling``'s fit."""
    side = multiple
    while side + multiple <= max_side:
        estimate = scaling.memory_mb((side + multiple,) * 3)
        if estimate is None or estimate > target_mb:
            break
        side += multiple
    return side


def measure_device(
    device: str,
    shape: tuple[int, int, int],
    large: tuple[int, int, int],
    n_points: int,
    max_ram_mb: float,
    timeout: float,
    deadline: float | None,
    probes: Sequence[float] = (0.5,),
    concurrent: bool = False,
) -> dict[str, Any]:
    """All figures for one device (keys without a device suffix).

    Order: OSS-Net at both sizes and the U-Net probes, side by side with one thread each when
    ``concurrent`` (memory figures are per process and unaffected; step seconds are slower than
    alone); then the U-Net at ``shape`` alone if its estimate fits the memory budget; then the
    large U-Net alone if it fits the memory and time budgets.

    ``probes`` are per-side fractions of ``shape`` at which the U-Net is measured first, smallest
    first; the last one is reported as ``unet3d_train_peak_mb_probe``.

    ``deadline`` (a ``time.perf_counter`` value) gates only the large U-Net: it is measured if
    its predicted step time ends before the deadline, else estimated.
    """
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    device_total_mb: float | None = None

    def record(key: str, res: dict[str, Any]) -> bool:
        """Put a run's peak and seconds under ``key``; False (with its error) if it failed."""
        out[key] = round_mb(res.get("peak_mb"))
        out[key.replace("peak_mb", "seconds")] = round_mb(res.get("seconds"), 2)
        if not res["ok"]:
            skipped[key] = res["error"]
        return bool(res["ok"])

    # 1. The OSS-Net runs and the U-Net probes (at a fraction of the size per side, they tell how
    # much the big U-Net runs will need); with ``concurrent`` side by side, one thread each.
    scaling = UNetScaling()
    probe_grids = [scaled_shape(shape, f) for f in probes]
    runs = [("ossnet", shape), ("ossnet", large)] + [("unet3d", g) for g in probe_grids]
    threads = 1 if concurrent else None
    with ThreadPoolExecutor(max_workers=len(runs) if concurrent else 1) as pool:
        results = list(pool.map(lambda run: measure_peak(run[0], run[1], device, n_points, timeout, threads), runs))
    out["small_runs_concurrent"] = bool(concurrent)
    for key, res in zip(("ossnet_train_peak_mb", "ossnet_train_peak_mb_large"), results):
        if not record(key, res):
            continue
        device_total_mb = res.get("device_total_mb") or device_total_mb
        if key == "ossnet_train_peak_mb":
            out["ossnet_params"], out["ossnet_step"] = res["params"], res["step"]
            out["optimizer"], out["method"] = res["optimizer"], res["method"]
    for i, (grid, res) in enumerate(zip(probe_grids, results[2:])):
        suffix = "" if i == len(probes) - 1 else f"_{i}"
        out[f"shape_probe{suffix}"] = list(grid)
        out[f"unet3d_train_peak_mb_probe{suffix}"] = round_mb(res.get("peak_mb"))
        if res["ok"]:
            out["unet3d_params"] = res["params"]
            # Probe step times only feed the time gate when they ran alone.
            scaling.add(grid, res["peak_mb"], res["seconds"] if not concurrent else math.nan)

    def gate(key: str, grid: tuple[int, int, int]) -> bool:
        """Record the U-Net estimate for ``grid``; False (with the reason) if it must not run."""
        estimate = scaling.memory_mb(grid)
        out[key + "_estimate"] = round_mb(estimate)
        out[key + "_estimate_from"] = scaling.describe()
        budget = _budget_mb(device, max_ram_mb, device_total_mb)
        predicted_s = scaling.seconds(grid)
        reason = ""
        if estimate is not None and estimate * SAFETY > budget:
            reason = (f"estimated {estimate / 1024:.1f} GiB (x{SAFETY} safety) exceeds "
                      f"the {budget / 1024:.1f} GiB memory budget")
        elif key.endswith("_large") and deadline is not None and predicted_s is not None:
            if time.perf_counter() + predicted_s > deadline:
                reason = f"predicted step time {predicted_s:.0f} s exceeds the remaining time budget"
        if reason:
            log.warning("[%s] 3D U-Net at %s not measured: %s; using the estimate", device, "x".join(map(str, grid)), reason)
            out[key], skipped[key] = None, reason
            return False
        log.info("[%s] 3D U-Net at %s (estimated %s MiB)", device, "x".join(map(str, grid)), round_mb(estimate, 0))
        return True

    def record_unet(key: str, grid: tuple[int, int, int], res: dict[str, Any]) -> None:
        if record(key, res):
            scaling.add(grid, res["peak_mb"], res["seconds"])

    # 2. The U-Net at the base size, alone, if its estimate fits the memory budget.
    if gate("unet3d_train_peak_mb", shape):
        record_unet("unet3d_train_peak_mb", shape, measure_peak("unet3d", shape, device, n_points, timeout))

    # 3. The crop-trained U-Net (nnU-Net / MONAI style): the largest cubic crop whose step needs no
    # more memory than OSS-Net's at the base size, measured alone. Its memory does not grow with
    # the volume, so it is the baseline at equal training memory.
    oss_mb = out.get("ossnet_train_peak_mb")
    if oss_mb:
        side = matching_crop(oss_mb, scaling, min(shape))
        res = measure_peak("unet3d", (side, side, side), device, n_points, timeout)
        out["unet3d_patch_crop"] = side
        record("unet3d_patch_train_peak_mb", res)

    # 4. The large U-Net, alone, if the fitted memory and step time allow.
    if gate("unet3d_train_peak_mb_large", large):
        record_unet("unet3d_train_peak_mb_large", large, measure_peak("unet3d", large, device, n_points, timeout))

    for suffix in ("", "_large"):
        oss = out.get(f"ossnet_train_peak_mb{suffix}")
        unet = out.get(f"unet3d_train_peak_mb{suffix}")
        estimated = unet is None
        if estimated:
            unet = out.get(f"unet3d_train_peak_mb{suffix}_estimate")
        out[f"ratio{suffix}"] = round(unet / oss, 2) if unet and oss else None
        out[f"ratio{suffix}_estimated"] = bool(estimated and out[f"ratio{suffix}"] is not None)
    # Growth from the BraTS grid to 1.5x per side (3.375x the voxels), same sources as the ratios.
    for model in ("ossnet", "unet3d"):
        base = out.get(f"{model}_train_peak_mb") or out.get(f"{model}_train_peak_mb_estimate")
        big = out.get(f"{model}_train_peak_mb_large") or out.get(f"{model}_train_peak_mb_large_estimate")
        out[f"{model}_growth_large"] = round(big / base, 2) if base and big else None
    out["skipped"] = skipped
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="all: CPU, plus CUDA when available"
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="override the base grid"
    )
    parser.add_argument("--points", type=int, default=N_POINTS, help="query points per volume (default 2**14)")
    parser.add_argument("--max-ram-gb", type=float, default=20.0, help="skip CPU runs estimated to need more RAM")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement subprocess")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds per device; the large U-Net is estimated instead of measured if it would end later "
        "(default: 60 with --quick, none otherwise)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()

    if args.worker is not None:  # the driver reports a failed size and goes on with the others
        return serve_worker(worker, args.worker, log, traceback_level=logging.DEBUG)
    if args.points < 1:
        parser.error(f"--points: must be >= 1, got {args.points}")

    import torch

    shape = tuple(args.shape) if args.shape else (QUICK_SHAPE if args.quick else BRATS_SHAPE)
    if min(shape) < 2:
        parser.error(f"--shape: sizes must be >= 2, got {shape}")
    large = scaled_shape(shape, LARGE_FACTOR)
    # A safety net only: a loaded 2-core machine can be ten times slower than an idle one.
    timeout = args.timeout or (1800.0 if args.quick else 7200.0)
    devices: list[str] = []
    if args.device in ("all", "cpu"):
        devices.append("cpu")
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            parser.error("--device cuda: CUDA is not available")

    start = time.perf_counter()
    budget_s = args.time_budget if args.time_budget is not None else (60.0 if args.quick else None)
    result: dict[str, Any] = {
        "benchmark": "memory",
        "quick": bool(args.quick),
        "variant": "C",
        "shape": list(shape),
        "shape_large": list(large),
        "n_points": args.points,
        "device": devices[0],
        "devices": devices,
    }
    for device in devices:
        # Each device gets the whole time budget: a fast card must not lose it to a slow CPU.
        deadline = time.perf_counter() + budget_s if budget_s else None
        figures = measure_device(
            device,
            shape,
            large,
            args.points,
            args.max_ram_gb * 1024.0,
            timeout,
            deadline,
            probes=(0.5,) if args.quick else (0.25, 0.5),
            # Quick CPU runs only: several processes on one card could crowd each other out.
            concurrent=bool(args.quick) and device == "cpu",
        )
        # The first device's figures carry the plain keys; further devices get a suffix.
        suffix = "" if device == devices[0] else f"_{device}"
        result.update({f"{key}{suffix}": value for key, value in figures.items()})
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    log.info(
        "ratio (U-Net / OSS-Net): %s at %s, %s at %s",
        result.get("ratio"),
        "x".join(map(str, shape)),
        result.get("ratio_large"),
        "x".join(map(str, large)),
    )
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
