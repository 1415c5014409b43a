"""List the cases of an inference input, with channels in the model's order.

NIfTI archives in the BraTS, LiTS and generic (``images/`` + ``labels/``, or CSV) layouts are
listed by ``ossnet_pipelines.ingest.sources.discover`` (labels optional: when present they become the
reference for Dice/IoU). This module adds what inference needs on top:

* the ``nifti`` layout: a flat folder, a glob, or a single file of single-channel NIfTI volumes,
  one case each (case id = file stem), with optional reference labels matched by stem;
* the ``zarr`` layout: the cases of an ossnet store written by ingestion (one split or all);
* mapping the input's channels onto the model's ``PreprocessSpec.modalities`` (by name when the
  names agree, else by position when the counts agree, else a job-level error).

Listing never reads voxels. Problems of one case become its ``error``; problems of the whole
input raise ``InferError`` before any work starts.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ossnet_pipelines.infer.job import InferError
from ossnet_pipelines.ingest.sources import IngestError, detect_layout, discover, source_fs
from ossnet_pipelines.store import case_id_for

logger = logging.getLogger(__name__)

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InferCase:
    """One case to segment.

    Attributes:
        case_id: output name (a safe single path component).
        kind: "nifti" (read from files) or "zarr" (read from the ingestion store).
        images: ``(model modality, path or URL)`` per channel, in the model's order ("nifti").
        label: reference label path (nifti) or ``"store"`` (zarr case with a label), or None.
        error: why the case cannot be processed, found while listing; None if fine.
    """

    case_id: str
    kind: str = "nifti"
    images: tuple[tuple[str, str], ...] = ()
    label: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class CaseListing:
    """The cases of an input.

    Attributes:
        layout: the layout used ("nifti", "brats", "lits", "generic" or "zarr").
        cases: the cases, sorted by id.
        input_modalities: channel names as the input calls them, in the model's order.
        store_url: the Zarr store (layout "zarr").
        store_channels: store channel index per model channel (layout "zarr").
    """

    layout: str
    cases: tuple[InferCase, ...]
    input_modalities: tuple[str, ...] = ()
    store_url: str | None = None
    store_channels: tuple[int, ...] = ()


def safe_case_id(name: str) -> str:
    """A file-name-safe case id from a file stem (``ossnet_pipelines.store.case_id_for``, as ingest
    derives them), "case" when nothing is left."""
    return case_id_for(name) or "case"


def _stem(path: str) -> str:
    return _NIFTI.sub("", posixpath.basename(path.rstrip("/")))


def _url(fs: Any, path: str, like: str) -> str:
    """``path`` as returned by ``fs`` turned back into a URL of the same scheme as ``like``."""
    if "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def _hidden(path: str) -> bool:
    """Hidden files (and our own temporary files) are never inputs."""
    return posixpath.basename(path).startswith(".")


def _under(path: str, prefix: str | None) -> bool:
    return bool(prefix) and (path == prefix or path.startswith(prefix.rstrip("/") + "/"))


def map_modalities(found: Sequence[str], model: Sequence[str], where: str) -> list[int]:
    """Index into ``found`` for each model channel.

    By name when the two sets of names agree (so a BraTS folder feeds ``flair, t1, t1ce, t2`` in
    the model's order whatever the file order), else by position when the counts agree.

    Raises:
        InferError: the channel counts differ.
    """
    found, model = list(found), list(model)
    if sorted(found) == sorted(model):
        return [found.index(m) for m in model]
    if len(found) != len(model):
        raise InferError(f"{where}: the input has {len(found)} channel(s) ({', '.join(found)}) but the model takes "
                         f"{len(model)} ({', '.join(model)})")
    if found != model:
        logger.info("infer: mapping input channels %s to model channels %s by position", found, model)
    return list(range(len(found)))


def _nifti_cases(fs: Any, input_url: str, files: Sequence[str], modality: str, labels: str | None,
                 options: Mapping[str, Any] | None) -> list[InferCase]:
    """One single-channel case per file; reference labels from ``labels`` by matching stem."""
    label_by_stem: dict[str, str] = {}
    if labels:
        lfs, lroot = source_fs(labels, options)
        if not lfs.isdir(lroot):
            raise InferError(f"{labels}: labels folder not found")
        for p in lfs.ls(lroot, detail=False):
            if _NIFTI.search(p):
                label_by_stem[_stem(p)] = _url(lfs, p, labels)
    seen: dict[str, int] = {}
    cases = []
    for path in sorted(files):
        stem = _stem(path)
        cid = safe_case_id(stem)
        seen[cid] = seen.get(cid, 0) + 1
        url = _url(fs, path, input_url)
        error = f"{url}: case id {cid!r} is not unique (file names differ only in unsafe characters)" \
            if seen[cid] > 1 else None
        cases.append(InferCase(cid, "nifti", ((modality, url),), label_by_stem.get(stem), error))
    return cases


def _list_nifti(input_url: str, modality: str, labels: str | None, options: Mapping[str, Any] | None,
                exclude: str | None) -> list[InferCase]:
    fs, path = source_fs(input_url, options)
    if _GLOB_CHARS.search(path):
        files = [p for p in fs.glob(path) if _NIFTI.search(p) and fs.isfile(p) and not _hidden(p)]
        if not files:
            raise InferError(f"{input_url}: the pattern matches no NIfTI files (.nii, .nii.gz)")
    elif fs.isfile(path):
        if not _NIFTI.search(path):
            raise InferError(f"{input_url}: not a NIfTI file (.nii, .nii.gz)")
        files = [path]
    elif fs.isdir(path):
        files = [p for p in fs.ls(path, detail=False) if _NIFTI.search(p) and fs.isfile(p) and not _hidden(p)]
        if not files:
            raise InferError(f"{input_url}: no NIfTI files (.nii, .nii.gz) directly in this folder")
    else:
        raise InferError(f"{input_url}: no such file, folder or pattern")
    _, out_path = source_fs(exclude, options) if exclude else (None, None)
    files = [p for p in files if not _under(p, out_path)]  # never read our own outputs back
    return _nifti_cases(fs, input_url, files, modality, labels, options)


def _is_store(fs: Any, path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or fs.isfile(posixpath.join(path, "zarr.json"))


def detect_input_layout(input_url: str, options: Mapping[str, Any] | None = None) -> str:
    """Guess the layout of an inference input (see ``InferJob.input``)."""
    fs, path = source_fs(input_url, options)
    if _GLOB_CHARS.search(path):
        return "nifti"
    if fs.isdir(path) and _is_store(fs, path):
        return "zarr"
    if fs.isfile(path):
        if _NIFTI.search(path):
            return "nifti"
        if path.lower().endswith(".csv"):
            return "generic"
        raise InferError(f"{input_url}: a file that is neither NIfTI nor CSV")
    if not fs.isdir(path):
        raise InferError(f"{input_url}: no such file, folder or pattern")
    try:
        layout = detect_layout(fs, path)
    except IngestError as exc:
        direct = [p for p in fs.ls(path, detail=False) if _NIFTI.search(p)]
        if direct:
            return "nifti"
        raise InferError(str(exc)) from exc
    if layout == "brats":
        # BraTS needs case folders; a flat folder whose names happen to end in _t1 is plain NIfTI.
        dirs = [e for e in fs.ls(path, detail=True) if e["type"] == "directory"]
        if not dirs:
            return "nifti"
    return layout


def _list_store(input_url: str, split: str | None, model_modalities: Sequence[str], volume_shape: Sequence[int],
                zscore_mask: str, options: Mapping[str, Any] | None, resample: str = "none") -> CaseListing:
    from ossnet_pipelines.store import StoreError, open_store

    try:
        store = open_store(input_url, "r", options)
    except StoreError as exc:
        raise InferError(str(exc)) from exc
    if tuple(store.volume_shape) != tuple(int(s) for s in volume_shape):
        raise InferError(f"{input_url}: the store holds cases on the grid {tuple(store.volume_shape)} but the model "
                         f"works on {tuple(volume_shape)}; ingest with the model's preset or use the NIfTI files")
    stored_mask = store.info.get("zscore_mask")
    if stored_mask is not None and stored_mask != zscore_mask:
        logger.warning("infer: %s was z-scored over %r voxels, the model expects %r", input_url, stored_mask,
                       zscore_mask)
    stored_resample = store.info.get("resample") or "none"
    if stored_resample != resample:
        logger.warning("infer: %s was resampled with %r, the model was trained on %r; masks still map back "
                       "through each case's own record", input_url, stored_resample, resample)
    channels = map_modalities(store.modalities, model_modalities, input_url)
    try:
        ids = store.case_ids(split)
    except ValueError as exc:
        raise InferError(f"{input_url}: {exc}") from exc
    if not ids:
        raise InferError(f"{input_url}: no complete cases" + (f" in split {split!r}" if split else ""))
    scanned = store.scan_cases()
    cases = tuple(
        InferCase(cid, "zarr", label="store" if scanned.get(cid, {}).get("has_label") else None) for cid in ids
    )
    return CaseListing("zarr", cases, tuple(store.modalities[i] for i in channels), input_url, tuple(channels))


def list_cases(
    input_url: str,
    model_modalities: Sequence[str],
    *,
    layout: str = "auto",
    labels: str | None = None,
    split: str | None = None,
    volume_shape: Sequence[int] = (),
    zscore_mask: str = "nonzero",
    storage_options: Mapping[str, Any] | None = None,
    exclude: str | None = None,
    resample: str = "none",
) -> CaseListing:
    """List the cases of an inference input, channels in the model's order.

    Args:
        input_url: see ``InferJob.input``.
        model_modalities: the model's ``PreprocessSpec.modalities``.
        layout: "auto" or one of ``INPUT_LAYOUTS``.
        labels: reference labels folder (nifti: matched by stem; generic: as in ingestion).
        split: Zarr input: one split, or None for all.
        volume_shape: the model grid (checked against a Zarr store's grid).
        zscore_mask: the model's z-score mask (compared with a Zarr store's).
        storage_options: fsspec options.
        resample: the model's resampling (compared with a Zarr store's).
        exclude: a folder whose files are never listed (the job's output folder).

    Raises:
        InferError: unreadable input, no cases, or channels that do not fit the model.
    """
    if layout == "auto":
        layout = detect_input_layout(input_url, storage_options)
        logger.debug("infer: %s looks like the %s layout", input_url, layout)
    if split is not None and layout != "zarr":
        raise InferError(f"{input_url}: --split applies to Zarr stores only (this input is {layout})")
    if layout == "zarr":
        return _list_store(input_url, split, model_modalities, volume_shape, zscore_mask, storage_options, resample)
    if layout == "nifti":
        map_modalities(("image",), model_modalities, input_url)  # single-channel files need a 1-channel model
        cases = _list_nifti(input_url, model_modalities[0], labels, storage_options, exclude)
        return CaseListing("nifti", tuple(sorted(cases, key=lambda c: c.case_id)), ("image",))
    fs, root = source_fs(input_url, storage_options)
    try:
        found = discover(fs, root, layout, labels_dir=labels, require_labels=False)
    except IngestError as exc:
        raise InferError(str(exc)) from exc
    order = map_modalities(found.layout.modalities, model_modalities, input_url)
    cases = []
    for spec in found.cases:
        images: tuple[tuple[str, str], ...] = ()
        error = spec.error
        if error is None and len(spec.images) != len(order):
            error = f"{spec.case_id}: {len(spec.images)} channel(s) found, the model takes {len(order)}"
        elif error is None:
            images = tuple((model_modalities[k], _url(fs, spec.images[i][1], input_url)) for k, i in enumerate(order))
        label = _url(fs, spec.label, input_url) if spec.label else None
        cases.append(InferCase(spec.case_id, "nifti", images, label, error))
    names = tuple(found.layout.modalities[i] for i in order)
    return CaseListing(found.layout.name, tuple(sorted(cases, key=lambda c: c.case_id)), names)


__all__ = ["CaseListing", "InferCase", "detect_input_layout", "list_cases", "map_modalities", "safe_case_id"]
