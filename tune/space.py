"""The search space of a sweep: YAML -> validated frozen models -> Optuna define-by-run.

Five parameters can be searched; each has a default range, and ``null`` takes it out of the
search (the training config's own value is then used by every trial)::

    space:
      alpha:        {low: 0.01, high: 1.0, zero: true}   # log-uniform; zero: also try alpha = 0
      patch_size:   [5, 7, 9, "7+14"]                     # "7+14": 7^3 patch + 14^3 window pooled to 7^3
      border_ratio: {low: 0.0, high: 0.9}                 # uniform
      band_width:   {low: 2, high: 8}                     # integers, both ends included
      lr:           {low: 1.0e-4, high: 3.0e-3}           # log-uniform

``alpha`` weighs the auxiliary low-resolution loss (variants C and D); ``zero: true`` adds a
categorical switch ``aux_loss`` whose ``false`` branch trains with ``alpha = 0`` (no auxiliary
loss), so TPE learns separately whether the auxiliary loss helps and how much. A patch size
``k`` keeps the single-scale variant (A or C); ``"k+2k"`` is the paper's multiscale option,
which turns A into B and C into D (``patch.multiscale``).

A trial's sampled settings are a flat dict (``{"aux_loss": True, "alpha": 0.12,
"patch_size": "7+14", ...}``); :func:`trial_overrides` turns it into ``TrainJob`` overrides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from pydantic import Field, model_validator

from ossnet.config import ConfigError, ModelConfig
from ossnet_pipelines.jobconfig import JobModel

if TYPE_CHECKING:
    import optuna

PARAMETERS: tuple[str, ...] = ("alpha", "patch_size", "border_ratio", "band_width", "lr")
#: Keys of a trial's sampled config (``aux_loss`` is the switch of ``alpha``'s zero branch).
SAMPLED_KEYS: tuple[str, ...] = ("aux_loss", *PARAMETERS)
_PATCH_RE = re.compile(r"^\s*(\d+)\s*(?:\+\s*(\d+)\s*)?$")
# Variant with the same encoder but single-scale / multiscale patches.
_SINGLE = {"A": "A", "B": "A", "C": "C", "D": "C"}
_MULTI = {"A": "B", "B": "B", "C": "D", "D": "D"}


class _Range(JobModel):
    """A numeric range ``[low, high]`` with ``low < high``."""

    low: float
    high: float

    @model_validator(mode="after")
    def _not_empty(self) -> "_Range":
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be < high ({self.high:g}); to keep one "
                              "value, set the parameter to null and put the value in the training config")
        return self


class AlphaSpace(_Range):
    """Auxiliary-loss weight: log-uniform in [low, high], plus alpha = 0 when ``zero``."""

    low: float = Field(0.01, gt=0.0, description="smallest non-zero alpha (log-uniform)")
    high: float = Field(1.0, gt=0.0, description="largest alpha")
    zero: bool = Field(True, description="also try alpha = 0 (no auxiliary loss)")


class BorderRatioSpace(_Range):
    """Fraction of training points drawn from the border band: uniform in [low, high]."""

    low: float = Field(0.0, ge=0.0, le=1.0)
    high: float = Field(0.9, ge=0.0, le=1.0)


class BandWidthSpace(_Range):
    """Half-width in voxels of the border band: an integer in [low, high] (both included)."""

    low: int = Field(2, ge=0)
    high: int = Field(8, ge=0)


class LrSpace(_Range):
    """Learning rate: log-uniform in [low, high]."""

    low: float = Field(1e-4, gt=0.0)
    high: float = Field(3e-3, gt=0.0)


@dataclass(frozen=True)
class PatchChoice:
    """One patch-size option: ``size`` (odd) and whether the pooled ``2*size`` window is added."""

    size: int
    multiscale: bool = False

    @property
    def label(self) -> str:
        return f"{self.size}+{2 * self.size}" if self.multiscale else str(self.size)

    @property
    def extent(self) -> int:
        """Edge of the largest window this option reads around a point."""
        return 2 * self.size if self.multiscale else self.size


def parse_patch_choice(value: Any, path: str = "patch_size") -> PatchChoice:
    """``7`` / ``"7"`` -> single scale; ``"7+14"`` -> multiscale. ConfigError naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{path}: expected an odd integer or 'k+2k' (e.g. '7+14'), got {value!r}")
    match = _PATCH_RE.match(str(value))
    if match is None:
        raise ConfigError(f"{path}: {value!r} is not a patch size; use an odd integer or 'k+2k' (e.g. '7+14')")
    size = int(match.group(1))
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"{path}: patch size {size} must be an odd integer >= 1")
    if match.group(2) is None:
        return PatchChoice(size)
    if int(match.group(2)) != 2 * size:
        raise ConfigError(f"{path}: {value!r}: the pooled window must be twice the patch ({size}+{2 * size})")
    return PatchChoice(size, multiscale=True)


class SearchSpace(JobModel):
    """What a sweep searches; ``None`` leaves a parameter at the training config's value."""

    alpha: Optional[AlphaSpace] = Field(default_factory=AlphaSpace)
    patch_size: Optional[tuple[Union[int, str], ...]] = Field((5, 7, 9, "7+14"),
                                                               description="odd sizes and 'k+2k' options")
    border_ratio: Optional[BorderRatioSpace] = Field(default_factory=BorderRatioSpace)
    band_width: Optional[BandWidthSpace] = Field(default_factory=BandWidthSpace)
    lr: Optional[LrSpace] = Field(default_factory=LrSpace)

    @model_validator(mode="after")
    def _choices(self) -> "SearchSpace":
        if self.patch_size is not None:
            if not self.patch_size:
                raise ConfigError("patch_size: no choices; list at least one or set it to null")
            labels = [parse_patch_choice(v, f"patch_size[{i}]").label for i, v in enumerate(self.patch_size)]
            duplicates = sorted({x for x in labels if labels.count(x) > 1})
            if duplicates:
                raise ConfigError(f"patch_size: duplicate choices {', '.join(duplicates)}")
        if self.searched() == ():
            raise ConfigError("space: every parameter is null; search at least one of " + ", ".join(PARAMETERS))
        return self

    def searched(self) -> tuple[str, ...]:
        """Names of the searched parameters, in ``PARAMETERS`` order."""
        return tuple(name for name in PARAMETERS if getattr(self, name) is not None)

    @property
    def patch_choices(self) -> tuple[PatchChoice, ...]:
        return tuple(parse_patch_choice(v) for v in self.patch_size or ())

    def validate_for(self, model: ModelConfig) -> None:
        """Check the space against the model every trial starts from.

        Raises:
            ConfigError: patch sizes for a model without patches or larger than its grid, or an
                alpha search for a variant without the low-resolution head.
        """
        if self.patch_size is not None:
            if not model.patch.enabled:
                raise ConfigError(f"space.patch_size: variant {model.variant} has no patches; "
                                  "set space.patch_size: null or use variant A, B, C or D")
            grid = min(model.volume_shape)
            for i, choice in enumerate(self.patch_choices):
                if choice.extent > grid:
                    raise ConfigError(f"space.patch_size[{i}]: {choice.label!r} reads a {choice.extent}^3 window, "
                                      f"larger than the {tuple(model.volume_shape)} grid")
        if self.alpha is not None and not model.has_lowres_head:
            raise ConfigError(f"space.alpha: variant {model.variant} has no low-resolution head, so alpha has "
                              "no effect; set space.alpha: null or use variant C or D")

    def check_point(self, point: Mapping[str, Any], path: str) -> None:
        """Check a user-given trial (``sweep.points_to_evaluate``): known names, values in range."""
        allowed = set(self.searched()) | ({"aux_loss"} if self.alpha is not None and self.alpha.zero else set())
        for key in point:
            if key not in allowed:
                raise ConfigError(f"{path}.{key}: not a searched parameter; expected one of: {', '.join(sorted(allowed))}")
        for name in self.searched():
            if name == "alpha" and point.get("aux_loss") is False:
                if "alpha" in point:
                    raise ConfigError(f"{path}.alpha: must be absent when aux_loss is false (alpha = 0)")
                continue
            if name not in point:
                raise ConfigError(f"{path}.{name}: missing (a starting point sets every searched parameter)")
            value = point[name]
            if name == "patch_size":
                labels = [c.label for c in self.patch_choices]
                if parse_patch_choice(value, f"{path}.patch_size").label not in labels:
                    raise ConfigError(f"{path}.patch_size: {value!r} is not one of {', '.join(labels)}")
                continue
            rng = getattr(self, name)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (name == "band_width" and int(value) != value) or not rng.low <= value <= rng.high:
                raise ConfigError(f"{path}.{name}: {value!r} is outside [{rng.low:g}, {rng.high:g}]")
        if "aux_loss" in point and not isinstance(point["aux_loss"], bool):
            raise ConfigError(f"{path}.aux_loss: expected true or false, got {point['aux_loss']!r}")

    def normalized_point(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """A starting point in the form Optuna's sampler records (patch labels, aux switch)."""
        out = dict(point)
        if "patch_size" in out:
            out["patch_size"] = parse_patch_choice(out["patch_size"]).label
        if self.alpha is not None and self.alpha.zero and "aux_loss" not in out:
            out["aux_loss"] = True
        if "band_width" in out:
            out["band_width"] = int(out["band_width"])
        return out

    def describe(self) -> list[str]:
        """One line per searched parameter, for logs and ``--dry-run``."""
        lines = []
        if self.alpha is not None:
            zero = " or 0 (no auxiliary loss)" if self.alpha.zero else ""
            lines.append(f"alpha: log-uniform [{self.alpha.low:g}, {self.alpha.high:g}]{zero}")
        if self.patch_size is not None:
            lines.append("patch_size: one of " + ", ".join(c.label for c in self.patch_choices))
        if self.border_ratio is not None:
            lines.append(f"border_ratio: uniform [{self.border_ratio.low:g}, {self.border_ratio.high:g}]")
        if self.band_width is not None:
            lines.append(f"band_width: integer [{self.band_width.low}, {self.band_width.high}]")
        if self.lr is not None:
            lines.append(f"lr: log-uniform [{self.lr.low:g}, {self.lr.high:g}]")
        return lines


class OptunaSpace:
    """The search space as an Optuna define-by-run function (picklable, for ``OptunaSearch``).

    The alpha switch makes the space conditional: ``alpha`` is only suggested when
    ``aux_loss`` is true, which the define-by-run form expresses and a fixed dict cannot.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        s = self.space
        if s.alpha is not None:
            if not s.alpha.zero or trial.suggest_categorical("aux_loss", [True, False]):
                trial.suggest_float("alpha", s.alpha.low, s.alpha.high, log=True)
        if s.patch_size is not None:
            trial.suggest_categorical("patch_size", [c.label for c in s.patch_choices])
        if s.border_ratio is not None:
            trial.suggest_float("border_ratio", s.border_ratio.low, s.border_ratio.high)
        if s.band_width is not None:
            trial.suggest_int("band_width", s.band_width.low, s.band_width.high)
        if s.lr is not None:
            trial.suggest_float("lr", s.lr.low, s.lr.high, log=True)


def trial_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The effective settings of a sampled config: ``alpha`` is 0 when ``aux_loss`` is false."""
    out = {k: config[k] for k in PARAMETERS if k in config}
    if config.get("aux_loss") is False:
        out["alpha"] = 0.0
    return {k: out[k] for k in PARAMETERS if k in out}


def trial_overrides(config: Mapping[str, Any], base_variant: str) -> list[tuple[str, Any]]:
    """``TrainJob`` overrides (dotted key, value) for one trial's sampled ``config``.

    Args:
        config: the sampled settings (keys of :data:`SAMPLED_KEYS`; others are ignored).
        base_variant: the training config's ``model.variant`` (A-D), whose encoder is kept.
    """
    settings = trial_settings(config)
    out: list[tuple[str, Any]] = []
    if "alpha" in settings:
        out.append(("train.alpha", float(settings["alpha"])))
    if "patch_size" in settings:
        choice = parse_patch_choice(settings["patch_size"])
        variant = (_MULTI if choice.multiscale else _SINGLE).get(base_variant, base_variant)
        out += [("model.variant", variant), ("model.patch_size", choice.size)]
    if "border_ratio" in settings:
        out.append(("sampling.border_ratio", float(settings["border_ratio"])))
    if "band_width" in settings:
        out.append(("sampling.band_width", int(settings["band_width"])))
    if "lr" in settings:
        out.append(("train.lr", float(settings["lr"])))
    return out


def format_setting(name: str, value: Any) -> str:
    """A setting for tables: floats with 4 significant digits, the rest as text."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return "" if value is None else str(value)


__all__ = [
    "AlphaSpace",
    "BandWidthSpace",
    "BorderRatioSpace",
    "LrSpace",
    "OptunaSpace",
    "PARAMETERS",
    "PatchChoice",
    "SAMPLED_KEYS",
    "SearchSpace",
    "format_setting",
    "parse_patch_choice",
    "trial_overrides",
    "trial_settings",
]
