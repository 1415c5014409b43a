"""One case of an ingest: NIfTI files -> validated, preprocessed arrays in the store.

``ingest_case(spec, ctx)`` is the unit of parallel work (a Ray task or a pool process). It opens
the store by URL itself and returns a small ``CaseReport``; it never raises for bad input.

Steps:

1. read the NIfTI headers; check dimensionality, that shapes and affines agree;
2. read and validate the label, binarise it, move it onto the model grid (RAS, centred crop/pad);
3. per channel: read through ``img.dataobj`` (scaled straight to float32), check finite, z-score,
   reorient, crop/pad, write ``image[c]`` and its trilinear ``image_lowres[c]``, free it;
4. write ``label``, ``label_lowres`` (max-pooled) and ``border`` (band around the boundary);
5. commit the case attrs (preprocess record, sources + sha256, spacing) with ``complete: true``.

Memory: one source channel as float32 plus its model-grid copy at a time (the label is uint8),
written in shard-aligned slabs. A 512^3 int16 case peaks at ~1.2 GiB (~4.6x its own size).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import fsspec
import nibabel as nib
import numpy as np

from ossnet.preprocess import PreprocessRecord, preprocess_channel, preprocess_label, validate_spatial_shape
from pipelines.ingest_sources import CaseSpec, LayoutInfo
from pipelines.store import open_store

logger = logging.getLogger(__name__)


class CaseError(ValueError):
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
    lowres_shape: tuple[int, int, int]
    latent_shape: tuple[int, int, int]
    lowres_factor: int
    band_width: int
    zscore_mask: str
    affine_atol: float
    extra_attrs: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """Collapse whitespace (newlines from nibabel or zarr messages) into one line."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def _local_files(paths: Iterable[str], options: Mapping[str, Any] | None) -> Iterator[dict[str, str]]:
    """Map each path to a local file: itself when local, else a temporary download."""
    with contextlib.ExitStack() as stack:
        out: dict[str, str] = {}
        tmpdir: str | None = None
        for path in paths:
            fs, p = fsspec.core.url_to_fs(path, **dict(options or {}))
            if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                out[path] = p
                continue
            if tmpdir is None:
                tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ossnet-ingest-"))
            local = os.path.join(tmpdir, f"{len(out)}-{os.path.basename(p)}")  # keep .nii.gz suffix
            fs.get_file(p, local)
            out[path] = local
        yield out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(path: str, shown: str) -> Any:
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise CaseError(f"{shown}: cannot read NIfTI header ({type(exc).__name__}: {one_line(exc)})") from exc


def _read(img: Any, shown: str, dtype: Any = None) -> np.ndarray:
    """Voxel data, scaled as the header says, squeezed to 3D.

    With ``dtype`` (float32 for images) nibabel scales directly in that dtype, so an int16
    volume never passes through float64; the result is always a private, writable array.
    Without it the on-disk dtype is kept (labels).
    """
    try:
        data = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError / zlib.error / OSError for truncated .nii.gz
        raise CaseError(f"{shown}: cannot read voxel data, truncated or corrupt file "
                        f"({type(exc).__name__}: {one_line(exc)})") from exc
    if dtype is not None and (isinstance(data, np.memmap) or not data.flags.writeable):
        data = np.array(data)  # a float32 .nii maps the file: copy before normalising in place
    return np.asarray(data).reshape(validate_spatial_shape(data.shape, shown))


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
    return CaseReport(spec.case_id, "ingested", "", seconds)


def _ingest_case(spec: CaseSpec, ctx: CaseContext) -> dict[str, Any]:
    # torch comes with ossnet.sampling: imported here so that `ossnet ingest --help` stays fast.
    from ossnet.sampling import border_band, downsample_image, lowres_label

    files = spec.files
    with _local_files(files.values(), ctx.source_options) as local:
        imgs = {key: _load(local[path], path) for key, path in files.items()}
        modalities = [m for m, _ in spec.images]
        if modalities != list(ctx.layout.modalities):
            raise CaseError(f"{spec.case_id}: modalities {modalities} != store modalities {list(ctx.layout.modalities)}")
        first_mod, first_path = spec.images[0]
        ref = imgs[first_mod]
        shape = validate_spatial_shape(ref.shape, first_path)
        affine = np.asarray(ref.affine, dtype=np.float64)
        for key, path in files.items():
            kind = "label" if key == "label" else "image"
            other = validate_spatial_shape(imgs[key].shape, path)
            if other != shape:
                raise CaseError(f"{path}: {kind} shape {other} != {first_path} shape {shape}")
            diff = float(np.abs(np.asarray(imgs[key].affine) - affine).max())
            if not np.isfinite(diff) or diff > ctx.affine_atol:
                raise CaseError(f"{path}: affine differs from {first_path} (max difference {diff:.4g})")
        record = PreprocessRecord.create(shape, affine, nib.io_orientation(affine), ctx.volume_shape, ctx.zscore_mask)
        store = open_store(ctx.store_url, "r+", ctx.storage_options)

        label_grid = None
        lost = 0
        if spec.label is not None:
            raw = _read(imgs["label"], spec.label)
            label_grid, lost = preprocess_label(raw, record, ctx.layout.allowed_labels, name=spec.label)
            del raw
            if lost:
                logger.warning("ingest: %s: cropping to %s removed %d foreground voxels", spec.case_id,
                               ctx.volume_shape, lost)

        sources: dict[str, dict[str, Any]] = {}
        means, stds = [], []
        with store.case_writer(spec.case_id) as writer:
            n = len(spec.images)
            writer.create_array("image", (n, *ctx.volume_shape), np.float16)
            writer.create_array("image_lowres", (n, *ctx.lowres_shape), np.float16)
            for c, (mod, path) in enumerate(spec.images):
                x = _read(imgs[mod], path, np.float32)  # private copy, normalised in place
                grid, mean, std = preprocess_channel(x, record, name=path)
                del x
                writer.write("image", grid, (c,))
                writer.write("image_lowres", downsample_image(grid[None], ctx.lowres_shape)[0], (c,))
                del grid
                means.append(mean)
                stds.append(std)
            label_voxels = border_voxels = 0
            if label_grid is not None:
                band = border_band(label_grid, ctx.band_width)
                writer.write_array("label", label_grid)
                writer.write_array("label_lowres", lowres_label(label_grid, ctx.lowres_factor).astype(np.uint8))
                writer.write_array("border", band.astype(np.uint8))
                label_voxels, border_voxels = int(label_grid.sum(dtype=np.int64)), int(band.sum(dtype=np.int64))
            for key, path in files.items():
                sources[key] = {"path": path, "size": int(os.path.getsize(local[path])), "sha256": _sha256(local[path])}
            record = record.with_stats(means, stds)
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
            }
            writer.commit(attrs)
        return attrs


__all__ = ["CaseContext", "CaseError", "CaseReport", "ingest_case", "one_line"]
