"""One case of an ingest: NIfTI files -> validated, preprocessed arrays in the store.

``ingest_case(spec, ctx)`` is the unit of parallel work (a Ray task or a pool process). It opens
the store by URL itself and returns a small ``CaseReport``; it never raises for bad input.

Steps (the transform is ``ossnet.geometry.PreprocessRecord``, run by ``ossnet_pipelines.volumes``):

1. read the NIfTI headers (``ossnet_pipelines.nifti``); check dimensionality, that shapes and affines
   agree and that the affine is usable (no zero, non-finite or sheared spacing);
2. build the case geometry: RAS orientation, the resample mode (``none``, ``resize`` or
   ``spacing``), centred crop/pad onto the model grid;
3. check the label's values and bring it onto the grid (nearest neighbour), with its border band;
4. per channel, lazily over file slabs: z-score statistics and the finite check in one pass,
   then normalise, reorient, resample (linear), crop/pad and write ``image[c]`` shard by shard;
5. commit the case attrs (preprocess record, sources + sha256, spacing) with ``complete: true``.

Memory: a few slabs (``ossnet_pipelines.nifti.SLAB_BYTES``) per dask thread plus grid-sized label
arrays, whatever the scan's size; ``ossnet_bench.ingest`` measures it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ossnet.targets import BINARY, TargetSpec
from ossnet_pipelines import nifti, volumes
from ossnet_pipelines.files import local_files
from ossnet_pipelines.ingest.sources import CaseSpec, LayoutInfo
from ossnet_pipelines.nifti import one_line
from ossnet_pipelines.store import open_store

logger = logging.getLogger(__name__)


class CaseError(nifti.NiftiError):
    """A case cannot be ingested; the one-line message names the file and the problem."""


@dataclass(frozen=True)
class CaseReport:
    """Outcome of one case: status "ingested", "skipped" (already complete) or "failed"."""

    case_id: str
    status: str
    message: str = ""
    seconds: float = 0.0
    split: str | None = None


@dataclass(frozen=True)
class CaseContext:
    """What a case task needs besides its ``CaseSpec`` (small, picklable)."""

    store_url: str
    storage_options: Mapping[str, Any] | None
    source_options: Mapping[str, Any] | None
    layout: LayoutInfo
    volume_shape: tuple[int, int, int]
    band_width: int
    zscore_mask: str
    affine_atol: float
    resample: str = "none"
    target_spacing: tuple[float, float, float] | None = None
    scheduler: str = "threads"
    threads: int = 1
    extra_attrs: Mapping[str, Any] = field(default_factory=dict)
    targets: TargetSpec = BINARY


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def ingest_case(spec: CaseSpec, ctx: CaseContext) -> CaseReport:
    """Ingest one case into the store; never raises for bad input (returns a failed report)."""
    t0 = time.perf_counter()
    if spec.error is not None:
        return CaseReport(spec.case_id, "failed", one_line(spec.error))
    try:
        attrs = _ingest_case(spec, ctx)
    except ValueError as exc:  # CaseError and the validators' errors name the file
        return CaseReport(spec.case_id, "failed", one_line(exc), time.perf_counter() - t0)
    except Exception as exc:  # keep the other cases going; the message names the case
        logger.exception("ingest: case %s failed unexpectedly", spec.case_id)
        return CaseReport(spec.case_id, "failed", one_line(f"{spec.case_id}: {type(exc).__name__}: {exc}"),
                          time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    logger.debug("ingest: %s done in %.1f s (%d label voxels)", spec.case_id, seconds, attrs["label_voxels"])
    return CaseReport(spec.case_id, "ingested", "; ".join(attrs.get("warnings", [])), seconds)


def _ingest_case(spec: CaseSpec, ctx: CaseContext) -> dict[str, Any]:
    from ossnet.border import target_bands  # scipy only: ingest never imports torch

    files = spec.files
    with local_files(files.values(), ctx.source_options) as local, contextlib.ExitStack() as stack:
        readable = {key: stack.enter_context(nifti.seekable(local[path], path)) for key, path in files.items()}
        imgs = {key: nifti.load(readable[key], path) for key, path in files.items()}
        modalities = [m for m, _ in spec.images]
        if modalities != list(ctx.layout.modalities):
            raise CaseError(f"{spec.case_id}: modalities {modalities} != store modalities {list(ctx.layout.modalities)}")
        first_mod, first_path = spec.images[0]
        order = [first_mod] + [k for k in files if k != first_mod]
        shape, affine = nifti.check_case({k: imgs[k] for k in order}, files, ctx.affine_atol)
        record = volumes.case_record(shape, affine, ctx.volume_shape, ctx.zscore_mask, ctx.resample,
                                     ctx.target_spacing, name=first_path)
        store = open_store(ctx.store_url, "r+", ctx.storage_options)
        with volumes.compute_options(ctx.scheduler, ctx.threads):
            label_grid = None
            lost = 0
            if spec.label is not None:
                label = nifti.lazy_volume(imgs["label"], spec.label, dtype=None)
                label_grid, lost = volumes.label_grid(label, record, ctx.layout.allowed_labels, spec.label,
                                                      keep_values=ctx.targets.kind != "binary")
                if lost:
                    logger.warning("ingest: %s: cropping to %s removed %d foreground voxels", spec.case_id,
                                   ctx.volume_shape, lost)
            channels = [(nifti.lazy_volume(imgs[mod], path), path) for mod, path in spec.images]
            notes: list[str] = []
            grid, record = volumes.image_grid(channels, record, notes)
            with store.case_writer(spec.case_id) as writer:
                array = writer.create_array("image", (len(channels), *ctx.volume_shape), np.float16)
                for c in range(len(channels)):
                    volumes.store_grid(grid[c], array, lead=(c,))
                label_voxels = border_voxels = 0
                target_voxels: dict[str, int] = {}
                if label_grid is not None:
                    band = target_bands(label_grid, ctx.targets, ctx.band_width)
                    writer.write_array("label", label_grid)
                    writer.write_array("border", band)
                    label_voxels, border_voxels = int(np.count_nonzero(label_grid)), int(np.count_nonzero(band))
                    if ctx.targets.kind != "binary":
                        target_voxels = {name: int(np.count_nonzero(mask)) for name, mask in
                                         zip(ctx.targets.names, ctx.targets.region_masks(label_grid))}
                sources = {key: {"path": path, "size": int(os.path.getsize(local[path])),
                                 "sha256": nifti.sha256_file(local[path])} for key, path in files.items()}
                attrs = {
                    **dict(ctx.extra_attrs),
                    "modalities": modalities,
                    "sources": sources,
                    "preprocess": record.to_dict(),
                    "spacing": list(record.spacing),
                    "affine": record.grid_affine.tolist(),
                    "original_shape": list(record.original_shape),
                    "volume_shape": list(record.volume_shape),
                    "has_label": label_grid is not None,
                    "label_voxels": label_voxels,
                    "label_voxels_cropped": int(lost),
                    "border_voxels": border_voxels,
                    "band_width": ctx.band_width,
                    **({"target_voxels": target_voxels} if target_voxels else {}),
                    **({"warnings": notes} if notes else {}),
                    **({"source_name": spec.source_name} if spec.source_name else {}),
                }
                writer.commit(attrs)
        return attrs


__all__ = ["CaseContext", "CaseError", "CaseReport", "ingest_case", "one_line"]
