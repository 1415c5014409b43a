"""The inference strategy object: encode once, decode query points in fixed-size chunks.

``Inferer`` is independent of the model (MONAI's inferers): it holds the compute device, the
chunk size, the output placement and the MISE settings, and works with any module exposing
``config`` (a ``ModelConfig``), ``encode(image_lowres)`` and ``decode(points, patches, encoding)``.
Peak decode memory is bounded by ``chunk_points`` (one chunk of patches and activations); the
value map itself is one ``(X, Y, Z)`` float32 and one bool volume on the compute device.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union, cast

import numpy as np
import torch
from torch import nn

from ossnet.config import ModelConfig
from ossnet.inference import mise
from ossnet.inference_options import (
    DEFAULT_COARSE_STRIDE,
    DEFAULT_PROBE_STRIDE,
    DEFAULT_RECALL_MARGIN,
    DEFAULT_SEED_THRESHOLD,
    MAX_RECALL_MARGIN,
    MODES,
)
from ossnet.sampling import downsample_image, extract_patches, normalize_points, pool_volume
from ossnet.targets import TargetSpec

logger = logging.getLogger(__name__)

Array = Union[np.ndarray, torch.Tensor]


@dataclass
class InferenceResult:
    """Prediction for one volume.

    Attributes:
        probability: ``(X, Y, Z)`` float32 (float16 if the inferer asks) at full resolution, or
            ``(T, X, Y, Z)`` for a model of T targets (each target region's probability): the
            decoder's occupancy probability where ``decoded``; elsewhere (MISE only) a trilinear
            interpolation of decoded values that lies on the same side of the threshold, not a
            probability (re-thresholding it at another value is wrong). NumPy on the host, or a
            tensor on ``Inferer.output_device``.
        mask: ``(X, Y, Z)`` bool, ``probability >= threshold`` (``(T, X, Y, Z)`` for T targets).
        decoded: ``(X, Y, Z)`` bool, voxels whose value came from the decoder (all for dense).
        n_queries: points decoded by the model (a dense pass decodes ``X * Y * Z``); for T
            targets every decoded point gives all T values, so a point two targets' MISE need is
            decoded once.
        label_map: ``(X, Y, Z)`` uint8 in the source's label convention
            (``TargetSpec.label_map``); None for binary models (the mask is the label). NumPy.
        target_queries: per target, the points its own MISE evaluated: their sum is what
            refining each target separately would decode (compare with ``n_queries``).
        seconds: wall time of encode + decode + assembly (device synchronised).
        mode: the mode that actually ran ("mise" when "mise_lowres" fell back).
        level_queries: points decoded per MISE stride, coarsest first (empty for dense); for T
            targets, each target's own MISE evaluations summed (see ``target_queries``).
    """

    probability: Array
    mask: Array
    n_queries: int
    seconds: float
    mode: str
    level_queries: dict[int, int] = field(default_factory=dict)
    decoded: Array | None = None
    label_map: np.ndarray | None = None
    target_queries: dict[str, int] = field(default_factory=dict)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (batch norm running statistics) for the duration, then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class Inferer:
    """Full-resolution prediction by dense decoding or multiresolution isosurface extraction.

    Attributes:
        mode: "dense" decodes every voxel; "mise" starts MISE from a dense coarse grid;
            "mise_lowres" starts MISE from the low-resolution head (variants C, D) and falls back
            to "mise", with a warning, for models without a head.
        chunk_points: points per decoder pass (bounds memory; 2**14 in the paper).
        device: compute device; the model must already be on it.
        threshold: decision threshold on the probability (inside is ``>= threshold``).
        coarse_stride: stride of the coarsest MISE grid of "mise", and of the nodes the low-res
            head seeds in "mise_lowres" (at most the model's low-res cell, so that every cell has
            nodes); a power of two. Default ``DEFAULT_COARSE_STRIDE`` (4, the reference code's
            coarsest stride): a ball of radius 2 * sqrt(3) ~ 3.5 always holds a node.
        probe_stride: "mise_lowres" also decodes every node of this coarser lattice and starts
            MISE there, so that structures the head misses are still found (see
            ``recall_margin``); 0 turns the probes off (the head alone decides where to look, and
            a confidently empty head decodes nothing). A power of two >= ``coarse_stride``.
            Default ``DEFAULT_PROBE_STRIDE`` (8: one query per 512 voxels).
        recall_margin: cells whose corner logits come within this many logits of the
            threshold's are refined too, not only those whose corners straddle it (the margin
            halves with every finer level). The MISE mask equals the dense mask whenever the
            decoder's logit changes by at most ``recall_margin / (start stride * sqrt(3) / 2)``
            per voxel (see ``ossnet.inference.mise``); 0 is the original MISE. Default
            ``DEFAULT_RECALL_MARGIN`` (8: 1.15 logits per voxel at the stride-8 start), chosen
            with ``ossnet_bench.mise``: more buys recall of small, sharp components with queries.
        seed_threshold: low-res probability from which a low-res cell seeds MISE, at most
            ``threshold`` (below it, so that weakly detected small structures are still
            searched). Default ``min(DEFAULT_SEED_THRESHOLD, threshold)`` (0.3).
        safety_band: coarse cells by which the seeded region is dilated before evaluation, so
            that low-res errors next to a seed are revisited (2: 8 voxels at stride 4, a quarter
            of a BraTS low-res cell; surfaces leaving the region are then followed by crack
            propagation, see ``ossnet.inference.mise``).
        dilation: extra ring of cells refined around straddling cells at every level (0 is the
            original MISE; crack propagation already follows surfaces out of refined regions).
        output_device: None returns NumPy arrays; otherwise torch tensors on this device.
        probability_dtype: "float32" or "float16" for the returned probability map.
    """

    mode: str = "mise_lowres"
    chunk_points: int = 2**14
    device: Union[str, torch.device] = "cpu"
    threshold: float = 0.5
    coarse_stride: int | None = None
    seed_threshold: float | None = None
    safety_band: int = 2
    probe_stride: int = DEFAULT_PROBE_STRIDE
    recall_margin: float = DEFAULT_RECALL_MARGIN
    dilation: int = 0
    output_device: Union[str, torch.device, None] = None
    probability_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"inferer.mode: unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.chunk_points < 1:
            raise ValueError(f"inferer.chunk_points: must be >= 1, got {self.chunk_points}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"inferer.threshold: must be in (0, 1), got {self.threshold}")
        if self.coarse_stride is not None and (self.coarse_stride < 2 or not _is_power_of_two(self.coarse_stride)):
            raise ValueError(
                f"inferer.coarse_stride: must be a power of two >= 2 (use mode 'dense' for every voxel), got {self.coarse_stride}"
            )
        if self.seed_threshold is not None and not 0.0 < self.seed_threshold <= self.threshold:
            raise ValueError(
                f"inferer.seed_threshold: must be in (0, threshold={self.threshold}], got {self.seed_threshold}"
            )
        if self.probe_stride and (not _is_power_of_two(self.probe_stride) or self.probe_stride < self.stride):
            raise ValueError(f"inferer.probe_stride: must be 0 or a power of two >= coarse_stride={self.stride}, "
                             f"got {self.probe_stride}")
        if not 0.0 <= self.recall_margin <= MAX_RECALL_MARGIN:
            raise ValueError(f"inferer.recall_margin: must be in [0, {MAX_RECALL_MARGIN:g}] (logits), "
                             f"got {self.recall_margin}")
        if self.safety_band < 0 or self.dilation < 0:
            raise ValueError(f"inferer.safety_band/dilation: must be >= 0, got {self.safety_band}/{self.dilation}")
        if self.probability_dtype not in ("float32", "float16"):
            raise ValueError(f"inferer.probability_dtype: 'float32' or 'float16', got {self.probability_dtype!r}")

    @property
    def stride(self) -> int:
        """The coarsest MISE stride actually used."""
        return self.coarse_stride if self.coarse_stride is not None else DEFAULT_COARSE_STRIDE

    @property
    def seed(self) -> float:
        """The low-res seed threshold actually used."""
        return self.seed_threshold if self.seed_threshold is not None else min(DEFAULT_SEED_THRESHOLD, self.threshold)

    def __call__(self, model: nn.Module, image: Array) -> InferenceResult:
        """Segment one volume.

        Args:
            model: an ``OSSNet`` (or anything with its ``config``/``encode``/``decode``), on ``device``.
            image: ``(C, X, Y, Z)`` normalised volume on ``model.config.volume_shape``.

        Returns:
            An ``InferenceResult`` at full resolution.
        """
        net: Any = getattr(model, "module", model)  # DDP / DataParallel wrappers: use the bare network
        cfg = cast(ModelConfig, net.config)
        device = torch.device(self.device)
        expected = (cfg.encoder.in_channels, *cfg.volume_shape)
        if tuple(image.shape) != tuple(expected):
            raise ValueError(f"image: expected shape {expected} (C, X, Y, Z), got {tuple(image.shape)}")
        param = next(net.parameters(), None)
        if param is not None and param.device.type != device.type:
            raise ValueError(f"inferer.device: model is on {param.device}, inferer computes on {device}")
        start = time.perf_counter()
        with _eval_mode(net), torch.inference_mode():
            volume = torch.as_tensor(image).to(device=device, dtype=torch.float32)
            # The same resampling as training (sampling.downsample_image), on the compute device.
            encoding = net.encode(downsample_image(volume, cfg.lowres_input_shape)[None])
            oracle = _ChunkedDecoder(net, volume, encoding, self.chunk_points)
            mode = self.mode
            if mode == "mise_lowres" and encoding.lowres_logits is None:
                logger.warning("variant %s has no low-resolution head: mode 'mise_lowres' runs 'mise'", cfg.variant)
                mode = "mise"
            if mode == "mise_lowres" and self.stride > cfg.lowres_factor:
                raise ValueError(f"inferer.coarse_stride: {self.stride} exceeds the model's low-res cell of "
                                 f"{cfg.lowres_factor} voxels (some cells would hold no node); use <= {cfg.lowres_factor}")
            lowres_prob = (_target_lowres(encoding.lowres_logits[0].float(), cfg)
                           if mode == "mise_lowres" else None)
            level_queries: dict[int, int] = {}
            target_queries: dict[str, int] = {}
            if mode == "dense":
                probability = oracle.dense(cfg.volume_shape)
                evaluated = None
            elif oracle.n_targets == 1:
                probability, evaluated = self._mise(oracle, cfg, device, mode, lowres_prob, level_queries)
            else:
                # One decoder pass serves every target: each target runs its own MISE on a shared
                # cache, so a point two targets need is decoded once (see ``target_queries``).
                cache = _TargetCache(oracle, cfg.volume_shape, device)
                maps = []
                for t, name in enumerate(cfg.targets.names):
                    counts: dict[int, int] = {}
                    values, _ = self._mise(cache.oracle(t), cfg, device, mode,
                                              None if lowres_prob is None else lowres_prob[t], counts)
                    maps.append(values)
                    target_queries[name] = sum(counts.values())
                    for stride, n in counts.items():
                        level_queries[stride] = level_queries.get(stride, 0) + n
                probability, evaluated = torch.stack(maps), cache.done
            out_device = torch.device(self.output_device) if self.output_device is not None else torch.device("cpu")
            dtype = torch.float16 if self.probability_dtype == "float16" else torch.float32
            mask = (probability >= self.threshold).to(out_device)
            if evaluated is None:
                decoded = torch.ones(tuple(cfg.volume_shape), dtype=torch.bool, device=out_device)
            else:
                decoded = evaluated.to(out_device)
            probability = probability.to(out_device, dtype)
            label_map = None
            if cfg.targets.kind != "binary":
                mask_np = mask.cpu().numpy()
                label_map = cfg.targets.label_map(mask_np if oracle.n_targets > 1 else mask_np[None])
            if out_device.type == "cuda":
                torch.cuda.synchronize(out_device)
        seconds = time.perf_counter() - start
        result = InferenceResult(
            probability=probability.numpy() if self.output_device is None else probability,
            mask=mask.numpy() if self.output_device is None else mask,
            n_queries=oracle.n_queries,
            seconds=seconds,
            mode=mode,
            level_queries=level_queries,
            decoded=decoded.numpy() if self.output_device is None else decoded,
            label_map=label_map,
            target_queries=target_queries,
        )
        logger.debug("inference %s: %d queries in %.3f s", mode, result.n_queries, seconds)
        return result

    def _mise(self, oracle: mise.Oracle, cfg: ModelConfig, device: torch.device, mode: str,
              lowres_prob: torch.Tensor | None, level_queries: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One MISE run on one target's oracle: ``(values (X, Y, Z), evaluated (X, Y, Z))``;
        adds its queries per stride to ``level_queries``."""
        state = mise.MiseState(cfg.volume_shape, device, oracle, self.threshold)
        if mode == "mise":
            coords, start_stride = mise.dense_start(state, self.stride), self.stride
        else:
            assert lowres_prob is not None
            coords, start_stride = mise.lowres_start(
                state, self.stride, lowres_prob, cfg.lowres_factor, self.seed, self.safety_band, self.probe_stride,
            )
        mise.refine(state, coords, start_stride, self.dilation, margin=self.recall_margin)
        level_queries.update(state.level_queries)
        return state.values, state.evaluated


def region_probabilities(logits: torch.Tensor, targets: TargetSpec, dim: int = -1) -> torch.Tensor:
    """Each target region's probability from a model's logits, with the output channels along
    ``dim``: the sigmoid for binary and regions; for classes the softmax over the K classes summed
    over each region's classes (liver = liver + tumour), the rule every decision here follows.

    Returns:
        ``logits``' shape with the K channels along ``dim`` replaced by the T regions (binary:
        the sigmoid of the single output, whatever its shape).
    """
    if targets.kind != "classes":
        return torch.sigmoid(logits)
    member = torch.as_tensor(targets.class_regions(), device=logits.device, dtype=torch.float32)  # (K, T)
    probs = torch.movedim(torch.softmax(logits.float(), dim=dim), dim, -1) @ member
    return torch.movedim(probs, -1, dim)


def _target_lowres(lowres_logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The low-res head's probability per target: ``(lx, ly, lz)`` for one target, else
    ``(T, lx, ly, lz)``; for classes, a region's cell probability is the largest of its classes'."""
    targets = cfg.targets
    prob = torch.sigmoid(lowres_logits)
    if targets.n_outputs == 1:
        return prob[0]
    if targets.kind == "classes":
        member = torch.as_tensor(targets.class_regions(), device=prob.device)  # (K, T)
        return (prob[:, None] * member[:, :, None, None, None]).amax(dim=0)
    return prob


class _TargetCache:
    """Every target's value at every decoded voxel, so several MISE runs share one decoder."""

    def __init__(self, decoder: "_ChunkedDecoder", shape: Sequence[int], device: torch.device) -> None:
        self.decoder = decoder
        self.values = torch.zeros((decoder.n_targets, *shape), dtype=torch.float32, device=device)
        self.done = torch.zeros(tuple(shape), dtype=torch.bool, device=device)

    def oracle(self, target: int) -> mise.Oracle:
        """Voxel indices ``(N, 3)`` -> target ``target``'s probabilities ``(N,)``."""

        def evaluate(points: torch.Tensor) -> torch.Tensor:
            x, y, z = points.unbind(1)
            new = ~self.done[x, y, z]
            if bool(new.any()):
                fresh = points[new]
                fx, fy, fz = fresh.unbind(1)
                self.values[:, fx, fy, fz] = self.decoder(fresh).T
                self.done[fx, fy, fz] = True
            return self.values[target, x, y, z]

        return evaluate


class _ChunkedDecoder:
    """Point oracle: voxel indices ``(N, 3)`` int64 -> probabilities ``(N,)`` float32 (``(N, T)``
    for T targets: each target region's probability), chunk by chunk."""

    def __init__(self, model: nn.Module, volume: torch.Tensor, encoding: Any, chunk_points: int) -> None:
        cfg = cast(ModelConfig, model.config)
        targets = cfg.targets
        self.n_targets = 1 if targets.n_outputs == 1 else targets.n_targets
        self.targets = targets
        self.model: Any = model  # anything with OSSNet's decode
        self.volume = volume
        self.encoding = encoding
        self.chunk = chunk_points
        self.shape = tuple(cfg.volume_shape)
        self.patch_size = cfg.patch.size if cfg.patch.enabled else 0
        self.multiscale = cfg.patch.multiscale
        # Pooled once per volume, not once per chunk, for the multiscale (B, D) patches.
        self.pooled = pool_volume(volume) if self.patch_size and self.multiscale else None
        self.n_queries = 0

    def _decode(self, points: torch.Tensor) -> torch.Tensor:
        patches = None
        if self.patch_size:
            patches = extract_patches(
                self.volume, points, size=self.patch_size, multiscale=self.multiscale, pooled=self.pooled
            )[None]
        coords = torch.as_tensor(normalize_points(points, self.shape)).to(self.volume.dtype)[None]
        return region_probabilities(self.model.decode(coords, patches, self.encoding)[0].float(), self.targets)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        width = () if self.n_targets == 1 else (self.n_targets,)
        out = torch.empty((points.shape[0], *width), dtype=torch.float32, device=self.volume.device)
        for lo in range(0, points.shape[0], self.chunk):
            out[lo : lo + self.chunk] = self._decode(points[lo : lo + self.chunk])
        self.n_queries += int(points.shape[0])
        return out

    def dense(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Decode every voxel; index chunks are generated on the fly so memory stays per-chunk."""
        x, y, z = shape
        total = x * y * z
        width = () if self.n_targets == 1 else (self.n_targets,)
        out = torch.empty((total, *width), dtype=torch.float32, device=self.volume.device)
        for lo in range(0, total, self.chunk):
            flat = torch.arange(lo, min(lo + self.chunk, total), device=self.volume.device)
            points = torch.stack([flat // (y * z), (flat // z) % y, flat % z], dim=1)
            out[lo : lo + flat.numel()] = self._decode(points)
        self.n_queries += total
        return out.view(shape) if self.n_targets == 1 else out.T.reshape(self.n_targets, *shape)


__all__ = [
    "DEFAULT_COARSE_STRIDE",
    "DEFAULT_PROBE_STRIDE",
    "DEFAULT_RECALL_MARGIN",
    "DEFAULT_SEED_THRESHOLD",
    "MAX_RECALL_MARGIN",
    "InferenceResult",
    "Inferer",
    "MODES",
    "region_probabilities",
]
