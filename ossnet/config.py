"""Frozen configuration dataclasses for OSS-Net models, sampling and augmentation.

Axis convention used across the project: a volume is ``(C, X, Y, Z)`` (channels first, then
the three array axes in the order nibabel returns them); a label is ``(X, Y, Z)``. Points are
voxel coordinates along those same axes. Spatial shapes are ``(X, Y, Z)`` tuples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, cast

from ossnet.errors import ConfigError
from ossnet.targets import TargetSpec

VARIANTS: tuple[str, ...] = ("onet", "A", "B", "C", "D")
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "relu", "silu", "elu", "gelu")
PRESETS: tuple[str, ...] = ("brats", "lits", "small", "tiny")
CBN_NORMS: tuple[str, ...] = ("layer", "feature", "pooled")
ENCODER_NORMS: tuple[str, ...] = ("batch", "instance", "group")
OPTIMIZERS: tuple[str, ...] = ("radam_lookahead", "radam", "adam")  # ossnet.training.make_optimizer


def _fail(field_name: str, message: str) -> None:
    raise ConfigError(f"{field_name}: {message}")


@dataclass(frozen=True)
class EncoderConfig:
    """3D CNN encoder over the x2-downscaled volume.

    Attributes:
        in_channels: image channels (modalities).
        channels: output channels of each residual block; every block halves the resolution.
        skip: skip encoder (variants C, D) producing a ``[latent_channels, cells]`` global latent.
        lowres_head: add the low-resolution segmentation head (variants C, D).
        latent_channels: channels of the skip encoder's global latent (1 + decoder blocks).
        norm: normalisation after every encoder convolution: "batch" (the paper), "instance"
            (per volume and channel, as nnU-Net) or "group" (GroupNorm, up to 8 groups).
            "instance" and "group" behave the same in training and inference whatever the batch.
    """

    in_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 128)
    skip: bool = False
    lowres_head: bool = False
    latent_channels: int = 6
    norm: str = "batch"

    def validate(self) -> None:
        if self.in_channels < 1:
            _fail("encoder.in_channels", f"must be >= 1, got {self.in_channels}")
        if not self.channels or any(c < 2 for c in self.channels):
            _fail("encoder.channels", f"need at least one block of >= 2 channels, got {self.channels}")
        if self.lowres_head and not self.skip:
            _fail("encoder.lowres_head", "the low-resolution head needs the skip encoder")
        if self.norm not in ENCODER_NORMS:
            _fail("encoder.norm", f"unknown normalisation {self.norm!r}; choose from {', '.join(ENCODER_NORMS)}")


@dataclass(frozen=True)
class PatchConfig:
    """Local full-resolution patch around each query point.

    Attributes:
        size: edge length of the cubic patch (odd); 0 disables patches (O-Net).
        multiscale: also take a ``2*size`` window average-pooled to ``size`` (variants B, D).
        kernel: kernel of the patch encoder's two convolutions; None means ``size`` (the paper's
            7^3 kernel on a 7^3 patch). The tiny test preset uses 3.
    """

    size: int = 7
    multiscale: bool = False
    kernel: int | None = None

    def validate(self) -> None:
        if self.size < 0 or (self.size > 0 and self.size % 2 == 0):
            _fail("patch.size", f"must be 0 or an odd positive integer, got {self.size}")
        if self.size == 0 and self.multiscale:
            _fail("patch.multiscale", "needs patch.size > 0")
        if self.kernel is not None and (self.kernel < 1 or self.kernel % 2 == 0):
            _fail("patch.kernel", f"must be an odd positive integer, got {self.kernel}")

    @property
    def conv_kernel(self) -> int:
        """Kernel edge of the patch encoder's convolutions."""
        return self.kernel if self.kernel is not None else self.size

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def feature_dim(self) -> int:
        """Length of the flattened local feature (``size**3``, 0 without patches)."""
        return self.size**3


@dataclass(frozen=True)
class DecoderConfig:
    """Occupancy-network decoder with conditional batch norm.

    Attributes:
        hidden: width of the fully connected residual blocks.
        n_blocks: number of residual blocks.
        cbn_norm: normalisation of the decoder. "layer" (the default) uses no batch statistics:
            the input layer normalises its per-point part (coordinates, patch feature) and its
            per-volume part (global latent) separately, and every conditional norm normalises
            each point over its features, so training and inference compute the same function
            whatever the batch. "feature" is Occupancy Networks' conditional batch norm (each
            feature over all points of the batch), "pooled" the OSS-Net reference code's (points
            and features together). The batch-norm modes learn per-batch statistics that
            inference replaces by running averages; with batches of one or a few similar
            volumes that substitution collapses predictions to all background (see
            ``ossnet.model.decoder.OccupancyDecoder``).
    """

    hidden: int = 512
    n_blocks: int = 5
    cbn_norm: str = "layer"

    def validate(self) -> None:
        if self.hidden < 1:
            _fail("decoder.hidden", f"must be >= 1, got {self.hidden}")
        if self.n_blocks < 1:
            _fail("decoder.n_blocks", f"must be >= 1, got {self.n_blocks}")
        if self.cbn_norm not in CBN_NORMS:
            _fail("decoder.cbn_norm", f"must be one of {', '.join(CBN_NORMS)}, got {self.cbn_norm!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A complete OSS-Net model.

    Attributes:
        variant: one of ``VARIANTS``.
        volume_shape: full-resolution grid ``(X, Y, Z)`` the model works on (padded).
        encoder, patch, decoder: component configs.
        activation: one of ``ACTIVATIONS``.
        targets: what it segments (``ossnet.targets``): binary (the paper; one output), nested
            regions or exclusive classes (K outputs per point and K low-res channels).
    """

    variant: str = "C"
    volume_shape: tuple[int, int, int] = (256, 256, 160)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    activation: str = "leaky_relu"
    targets: TargetSpec = field(default_factory=TargetSpec)

    def validate(self) -> "ModelConfig":
        """Check every field; raise ``ConfigError`` naming the first bad one. Returns self."""
        if self.variant not in VARIANTS:
            _fail("model.variant", f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.activation not in ACTIVATIONS:
            _fail("model.activation", f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        if len(self.volume_shape) != 3 or any(int(s) < 2 for s in self.volume_shape):
            _fail("model.volume_shape", f"need three sizes >= 2, got {self.volume_shape}")
        self.encoder.validate()
        self.patch.validate()
        self.decoder.validate()
        self.targets.validate()
        return self

    @property
    def lowres_input_shape(self) -> tuple[int, int, int]:
        """Encoder input grid: the volume downscaled x2 (ceil for odd sizes)."""
        return tuple(math.ceil(s / 2) for s in self.volume_shape)  # type: ignore[return-value]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Spatial grid of the last encoder block (and of the low-res segmentation)."""
        shape = self.lowres_input_shape
        for _ in self.encoder.channels:
            shape = tuple(math.ceil(s / 2) for s in shape)  # type: ignore[assignment]
        return shape  # type: ignore[return-value]

    @property
    def lowres_factor(self) -> int:
        """Full-resolution voxels per low-res cell along each axis (2 * 2**blocks)."""
        return 2 ** (len(self.encoder.channels) + 1)

    @property
    def latent_dim(self) -> int:
        """Length of one global latent vector (cells of the last encoder block)."""
        return math.prod(self.latent_shape)

    @property
    def patch_channels(self) -> int:
        """Channels of a patch tensor fed to the patch encoder."""
        return self.encoder.in_channels * (2 if self.patch.multiscale else 1)

    @property
    def has_lowres_head(self) -> bool:
        return self.encoder.lowres_head


_VARIANT_PARTS: dict[str, dict[str, Any]] = {
    "onet": dict(skip=False, lowres_head=False, patch_size=0, multiscale=False),
    "A": dict(skip=False, lowres_head=False, patch_size=7, multiscale=False),
    "B": dict(skip=False, lowres_head=False, patch_size=7, multiscale=True),
    "C": dict(skip=True, lowres_head=True, patch_size=7, multiscale=False),
    "D": dict(skip=True, lowres_head=True, patch_size=7, multiscale=True),
}

# Dataset presets: full-resolution grid, channels, encoder widths, decoder width (and patch
# size / patch-encoder kernel where they differ from the paper).
_PRESETS: dict[str, dict[str, Any]] = {
    "brats": dict(volume_shape=(256, 256, 160), in_channels=4, channels=(16, 32, 64, 128), hidden=512),
    # LiTS scans have 75 to 990 slices: the paper resizes every volume to 512^3 (see preset_resample).
    "lits": dict(volume_shape=(512, 512, 512), in_channels=1, channels=(8, 16, 32, 64, 128), hidden=512,
                 resample="resize"),
    # Small grids for the quickstart and the tests: same structure, a fraction of the size.
    # small: 5^3 patches with a whole-patch kernel, applied as one matmul: cheap on a CPU.
    "small": dict(volume_shape=(64, 64, 48), in_channels=4, channels=(8, 16, 32), hidden=64, patch_size=5),
    "tiny": dict(volume_shape=(32, 32, 24), in_channels=4, channels=(4, 8), hidden=32, patch_kernel=3),
}


def preset_resample(preset: str) -> str:
    """How a preset's scans reach its grid by default: "resize" for LiTS (as the paper), else
    "none" (reorient and crop/pad only); see ``ossnet.geometry``."""
    if preset not in _PRESETS:
        _fail("model.preset", f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return str(_PRESETS[preset].get("resample", "none"))


def model_config(
    variant: str = "C",
    preset: str = "brats",
    *,
    activation: str = "leaky_relu",
    patch_size: int | None = None,
    in_channels: int | None = None,
    volume_shape: tuple[int, int, int] | None = None,
    cbn_norm: str = "layer",
    encoder_norm: str = "batch",
    targets: TargetSpec | None = None,
) -> ModelConfig:
    """Build and validate the ``ModelConfig`` for a variant at a dataset preset.

    Args:
        variant: "onet", "A", "B", "C" or "D" (case-insensitive for letters; "o-net" accepted).
        preset: "brats", "lits", "small" or "tiny".
        activation: activation name for every layer.
        patch_size: override the patch edge (odd); ignored for O-Net.
        in_channels: override the number of image channels.
        volume_shape: override the full-resolution grid.
        cbn_norm: "layer", "feature" or "pooled" conditional normalisation (``DecoderConfig``).
        encoder_norm: "batch", "instance" or "group" (``EncoderConfig``).
        targets: what the model segments (default binary, as the paper).
    """
    key = variant.strip()
    if key.lower() in ("onet", "o-net", "o_net"):
        key = "onet"
    elif len(key) == 1:
        key = key.upper()
    if key not in _VARIANT_PARTS:
        _fail("model.variant", f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if preset not in _PRESETS:
        _fail("model.preset", f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    parts = _VARIANT_PARTS[key]
    p = _PRESETS[preset]
    size = parts["patch_size"]
    if size > 0 and "patch_size" in p:
        size = p["patch_size"]
    if patch_size is not None and size > 0:
        size = int(patch_size)
    cfg = ModelConfig(
        variant=key,
        volume_shape=cast("tuple[int, int, int]", tuple(volume_shape) if volume_shape is not None else p["volume_shape"]),
        encoder=EncoderConfig(
            in_channels=in_channels if in_channels is not None else p["in_channels"],
            channels=tuple(p["channels"]),
            skip=parts["skip"],
            lowres_head=parts["lowres_head"],
            norm=encoder_norm,
        ),
        patch=PatchConfig(
            size=size,
            multiscale=parts["multiscale"],
            kernel=min(p["patch_kernel"], size) if size > 0 and "patch_kernel" in p else None,
        ),
        decoder=DecoderConfig(hidden=p["hidden"], cbn_norm=cbn_norm),
        activation=activation,
        targets=targets if targets is not None else TargetSpec(),
    )
    return cfg.validate()


@dataclass(frozen=True)
class SamplingConfig:
    """Training point sampling.

    Attributes:
        n_points: points per volume (2**14 in the paper).
        border_ratio: fraction drawn from the border band (0 = uniform sampling).
        band_width: half-width in voxels of the band around the label boundary (6 in the paper).
    """

    n_points: int = 2**14
    border_ratio: float = 0.0
    band_width: int = 6

    def validate(self) -> "SamplingConfig":
        if self.n_points < 1:
            _fail("sampling.n_points", f"must be >= 1, got {self.n_points}")
        if not 0.0 <= self.border_ratio <= 1.0:
            _fail("sampling.border_ratio", f"must be in [0, 1], got {self.border_ratio}")
        if self.band_width < 0:
            _fail("sampling.band_width", f"must be >= 0, got {self.band_width}")
        return self


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities and magnitudes (paper defaults: p = 0.5 each)."""

    p_flip: float = 0.5
    p_brightness: float = 0.5
    brightness: float = 0.15
    p_noise: float = 0.5
    noise_sigma: float = 0.15

    def validate(self) -> "AugmentConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                _fail(f"augment.{f.name}", f"must be in [0, 1], got {value}")
            if not f.name.startswith("p_") and value < 0:
                _fail(f"augment.{f.name}", f"must be >= 0, got {value}")
        return self

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation (validation, inference)."""
        return cls(p_flip=0.0, p_brightness=0.0, p_noise=0.0)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config dataclass (tuples become lists), for JSON/YAML."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = [list(v) if isinstance(v, tuple) else v for v in value]
        else:
            out[f.name] = value
    return out


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict`` for ``ModelConfig``; validates the result."""
    try:
        cfg = ModelConfig(
            variant=data["variant"],
            volume_shape=cast("tuple[int, int, int]", tuple(int(s) for s in data["volume_shape"])),
            encoder=EncoderConfig(**{**data["encoder"], "channels": tuple(data["encoder"]["channels"])}),
            patch=PatchConfig(**data["patch"]),
            decoder=DecoderConfig(**data["decoder"]),
            activation=data["activation"],
            targets=TargetSpec.from_dict(data.get("targets")),  # absent: a binary checkpoint
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"model: malformed model config ({exc})") from exc
    return cfg.validate()


__all__ = [
    "ACTIVATIONS",
    "AugmentConfig",
    "CBN_NORMS",
    "ConfigError",
    "DecoderConfig",
    "ENCODER_NORMS",
    "EncoderConfig",
    "ModelConfig",
    "PRESETS",
    "PatchConfig",
    "SamplingConfig",
    "TargetSpec",
    "VARIANTS",
    "config_to_dict",
    "model_config",
    "model_config_from_dict",
    "preset_resample",
    "replace",
]
