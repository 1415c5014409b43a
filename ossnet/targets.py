"""What a model segments: one binary target (the paper), nested regions, or exclusive classes.

A ``TargetSpec`` maps a label volume in the source's own convention (BraTS 0, 1, 2, 4; LiTS 0,
1, 2) to what the network learns, and the network's decisions back to that convention:

* ``binary``: one output, foreground = every non-zero value (the paper; the default). Identical
  to the model without a target spec: same parameters, same outputs.
* ``regions``: K nested or overlapping targets, one sigmoid each (BraTS practice: whole tumour
  = 1, 2, 4; tumour core = 1, 4; enhancing tumour = 4). A point's target is ``[K]`` indicators.
* ``classes``: mutually exclusive source values, one softmax over ``label_values`` (background
  first); a point's target is the index of its value. The named targets (liver = 1, 2;
  tumour = 2) are the regions the metrics and per-target masks report.

Writing a label map from region decisions (:meth:`TargetSpec.label_map`): a voxel gets the source
value whose set of regions is the largest one the voxel is inside of. So a region counts only
where the regions enclosing it in the convention hold too (an "enhancing" voxel outside the
predicted core is written as what the core and whole-tumour decisions say), and the written map
is always consistent: ET inside TC inside WT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ossnet.errors import ConfigError

TASK_KINDS: tuple[str, ...] = ("binary", "regions", "classes")
MAX_REGIONS = 8  # targets of one map: one bit each in the stored border-band mask


class TargetError(ConfigError):
    """A target spec is malformed, or a label holds a value the spec does not map; one line."""


@dataclass(frozen=True)
class TargetSpec:
    """Targets of a model, in the source's label convention.

    Attributes:
        kind: "binary", "regions" or "classes" (``TASK_KINDS``).
        label_values: every value a label may hold, background (0) first; for "binary" only a
            record (every non-zero value is foreground).
        names: one name per target (``("wt", "tc", "et")``).
        regions: per target, the source values inside it (``((1, 2, 4), (1, 4), (4,))``).
    """

    kind: str = "binary"
    label_values: tuple[int, ...] = (0, 1)
    names: tuple[str, ...] = ("foreground",)
    regions: tuple[tuple[int, ...], ...] = ((1,),)

    def validate(self) -> "TargetSpec":
        """Check the spec; raise ``TargetError`` naming the bad field. Returns self."""
        if self.kind not in TASK_KINDS:
            raise TargetError(f"targets.kind: must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}")
        values = list(self.label_values)
        if not values or values[0] != 0 or len(set(values)) != len(values) or min(values) < 0 or max(values) > 255:
            raise TargetError(f"targets.label_values: need distinct values in 0..255, background 0 first, got {values}")
        if not self.names or len(self.names) != len(self.regions):
            raise TargetError(f"targets.names: one name per region, got {len(self.names)} names for "
                              f"{len(self.regions)} regions")
        if len(set(self.names)) != len(self.names) or not all(n and n.isidentifier() for n in self.names):
            raise TargetError(f"targets.names: need distinct identifiers (letters, digits, '_'), got {list(self.names)}")
        for name, region in zip(self.names, self.regions):
            if not region or not set(region) <= set(values[1:]):
                raise TargetError(f"targets.regions.{name}: need non-zero values of label_values {values}, "
                                  f"got {list(region)}")
        if self.kind == "binary" and len(self.names) != 1:
            raise TargetError(f"targets.names: a binary task has one target, got {len(self.names)}")
        if len(self.names) > MAX_REGIONS:  # every target's border band is one bit of a uint8
            raise TargetError(f"targets.names: at most {MAX_REGIONS} targets, got {len(self.names)}")
        return self

    @property
    def n_targets(self) -> int:
        return len(self.names)

    @property
    def n_outputs(self) -> int:
        """Logits per point: 1 (binary), one per region, or one per label value (classes)."""
        return len(self.label_values) if self.kind == "classes" else len(self.names)

    # ----------------------------------------------------------------- labels -> training targets

    def check_values(self, found: Any, what: str = "label") -> None:
        """Raise ``TargetError`` when ``found`` holds a value outside ``label_values`` (binary: any)."""
        if self.kind == "binary":
            return
        unknown = sorted(set(int(v) for v in np.unique(np.asarray(found))) - set(self.label_values))
        if unknown:
            raise TargetError(f"{what}: values {unknown} are not in the target map's label values "
                              f"{list(self.label_values)}")

    def region_masks(self, label: Any) -> np.ndarray:
        """``(T, *label.shape)`` bool: each target's region of a label in the source convention."""
        label = np.asarray(label)
        if self.kind == "binary":
            return (label > 0)[None]
        return np.stack([np.isin(label, region) for region in self.regions])

    def point_targets(self, values: Any) -> np.ndarray:
        """Training targets of points from their label values ``(N,)``: binary ``(N,)`` float32 in
        {0, 1}; regions ``(N, K)`` float32 (``(N,)`` for one region, as the model's one output is
        squeezed); classes ``(N,)`` int64 indices into ``label_values``."""
        values = np.asarray(values)
        if self.kind == "binary":
            return (values > 0).astype(np.float32)
        if self.kind == "regions":
            masks = self.region_masks(values).astype(np.float32)
            return masks[0] if self.n_targets == 1 else np.moveaxis(masks, 0, -1)
        return self.class_index(values)

    def class_index(self, label: Any) -> np.ndarray:
        """Index into ``label_values`` of every voxel (int64); ``TargetError`` on an unknown value."""
        label = np.asarray(label)
        lut = np.full(256, -1, dtype=np.int64)
        lut[list(self.label_values)] = np.arange(len(self.label_values))
        if label.size and (label.min() < 0 or label.max() > 255):
            self.check_values(label)
        index = lut[label.astype(np.int64)]
        if index.size and index.min() < 0:
            self.check_values(label)
        return index

    def output_masks(self, label: Any) -> np.ndarray:
        """``(K, *shape)`` bool, one per output channel: the regions, or each class's voxels (classes)."""
        if self.kind != "classes":
            return self.region_masks(label)
        index = self.class_index(label)
        return np.stack([index == k for k in range(self.n_outputs)])

    # ----------------------------------------------------------------- decisions -> label map

    def label_map(self, decisions: Any) -> np.ndarray:
        """The label map in the source convention from per-target region decisions.

        Every kind decides per target region (for classes: the region's summed class
        probabilities), then writes each voxel as the source value whose set of regions is the
        largest one the voxel is inside of (see the module docstring).

        Args:
            decisions: binary: a mask ``(...)``; otherwise ``(T, ...)`` bool, one per target.

        Returns:
            ``(...)`` uint8 label values (binary: 0/1).
        """
        decisions = np.asarray(decisions)
        if self.kind == "binary":
            return (decisions > 0).astype(np.uint8)
        if decisions.shape[0] != self.n_targets:
            raise ValueError(f"decisions: expected {self.n_targets} regions first, got shape {decisions.shape}")
        out = np.zeros(decisions.shape[1:], dtype=np.uint8)
        for value, members in sorted(self._value_regions().items(), key=lambda item: len(item[1])):
            if members:
                out[np.logical_and.reduce([decisions[t] for t in members])] = value
        return out

    def class_regions(self) -> np.ndarray:
        """``(K, T)`` float32: 1 where class ``k`` (a label value) lies in target ``t``'s region,
        so class probabilities ``@`` this matrix are the targets' region probabilities."""
        return np.array([[float(v in region) for region in self.regions] for v in self.label_values], dtype=np.float32)

    def _value_regions(self) -> dict[int, tuple[int, ...]]:
        """Each non-zero source value -> the targets whose region contains it."""
        return {v: tuple(t for t, region in enumerate(self.regions) if v in region) for v in self.label_values[1:]}

    # ----------------------------------------------------------------- plain form

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label_values": list(self.label_values), "names": list(self.names),
                "regions": [list(r) for r in self.regions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "TargetSpec":
        """Inverse of ``to_dict``; None (a checkpoint from before target specs) is binary."""
        if data is None:
            return cls()
        try:
            return cls(kind=str(data["kind"]), label_values=tuple(int(v) for v in data["label_values"]),
                       names=tuple(str(n) for n in data["names"]),
                       regions=tuple(tuple(int(v) for v in r) for r in data["regions"])).validate()
        except (KeyError, TypeError) as exc:
            raise TargetError(f"targets: malformed target map ({exc})") from None

    def describe(self) -> str:
        """One line: ``regions wt=1,2,4 tc=1,4 et=4 (label values 0,1,2,4)``."""
        parts = " ".join(f"{n}={','.join(map(str, r))}" for n, r in zip(self.names, self.regions))
        return f"{self.kind} {parts} (label values {','.join(map(str, self.label_values))})"


BINARY = TargetSpec()

#: Target maps by name (``targets:`` in ingest and training configs).
TARGET_PRESETS: dict[str, TargetSpec] = {
    "binary": BINARY,
    "brats-regions": TargetSpec("regions", (0, 1, 2, 4), ("wt", "tc", "et"), ((1, 2, 4), (1, 4), (4,))),
    # BraTS 2023 and later label enhancing tumour 3 instead of 4.
    "brats2023-regions": TargetSpec("regions", (0, 1, 2, 3), ("wt", "tc", "et"), ((1, 2, 3), (1, 3), (3,))),
    "lits-classes": TargetSpec("classes", (0, 1, 2), ("liver", "tumour"), ((1, 2), (2,))),
}


def target_preset(name: str) -> TargetSpec:
    """The named target map; ``TargetError`` listing the names otherwise."""
    if name not in TARGET_PRESETS:
        raise TargetError(f"targets: unknown target map {name!r}; choose from {', '.join(TARGET_PRESETS)}")
    return TARGET_PRESETS[name]


__all__ = ["BINARY", "MAX_REGIONS", "TARGET_PRESETS", "TASK_KINDS", "TargetError", "TargetSpec", "target_preset"]
