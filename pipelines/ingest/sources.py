"""Find the cases of a NIfTI archive: BraTS 2020, LiTS and generic layouts, split files.

Discovery only lists files (local paths or fsspec URLs); it never reads voxels. Problems that
concern one case (an empty case folder, a missing modality, an unsafe case id) become that
case's ``error`` so the other cases still ingest; problems with the whole source raise
``IngestError``.

Layouts:
    brats:   ``<root>/<case_id>/<case_id>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (BraTS 2020).
    lits:    ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` anywhere under ``<root>``;
             case id ``lits-NNN``.
    generic: ``<root>/images`` (or ``imagesTr``) and ``<root>/labels`` (or ``labelsTr``, or an
             explicit labels folder) matched by file stem; multi-channel cases follow the
             nnU-Net convention ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``. Or a CSV file with
             channel columns ``image`` / ``image_<modality>``, a ``label`` column and an optional
             ``case_id`` column (relative paths are resolved against the CSV's folder).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import fsspec

from ossnet_pipelines.store import SPLITS, case_id_for, validate_case_id

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("auto", "brats", "lits", "generic")
BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


class IngestError(ValueError):
    """A problem with the whole ingest (source, split file, store, job); one line, names the path."""


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout means for labels and normalisation.

    Attributes:
        name: "brats", "lits" or "generic".
        modalities: channel names in stored channel order.
        allowed_labels: label values accepted in the source files.
        label_meaning: what the binary label means.
        zscore_mask: default z-score mask ("nonzero" for skull-stripped MR, "all" otherwise).
    """

    name: str
    modalities: tuple[str, ...]
    allowed_labels: tuple[int, ...]
    label_meaning: str
    zscore_mask: str


@dataclass(frozen=True)
class CaseSpec:
    """One case to ingest: where its files are, or why it cannot be ingested.

    Attributes:
        case_id: store name of the case (``case_id_for``: a file or folder name mapped to
            letters, digits, '.', '_' and '-').
        images: ``(modality, path)`` per channel, in ``LayoutInfo.modalities`` order.
        label: label path, or None (unlabelled).
        error: a one-line reason this case fails before any file is read, or None.
        source_name: the name the id was derived from, when it differs (kept in the case's
            attributes).
    """

    case_id: str
    images: tuple[tuple[str, str], ...] = ()
    label: str | None = None
    error: str | None = None
    source_name: str | None = None

    @property
    def files(self) -> dict[str, str]:
        """Source key (modality or ``"label"``) -> path."""
        out = dict(self.images)
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass
class Discovery:
    """Result of scanning a source.

    Attributes:
        layout: what the layout's labels mean.
        cases: one spec per case, failed ones included.
        hidden: hidden entries skipped (names starting with '.' or '__'), so the summary can say so.
    """

    layout: LayoutInfo
    cases: list[CaseSpec] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)


def source_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a local path, ``file://`` or remote URL."""
    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def _name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _stem(path: str) -> str:
    return _NIFTI.sub("", _name(path))


HIDDEN_PREFIXES: tuple[str, ...] = (".", "__")


def _ls(fs: Any, path: str, hidden: list[str] | None = None) -> tuple[list[str], list[str]]:
    """``(folders, files)`` directly under ``path``, sorted; hidden entries (names starting with
    ``HIDDEN_PREFIXES``) are skipped and appended to ``hidden``."""
    dirs, files = [], []
    for entry in fs.ls(path, detail=True):
        name = _name(entry["name"])
        if name.startswith(HIDDEN_PREFIXES):
            if hidden is not None:
                hidden.append(entry["name"])
            continue
        (dirs if entry["type"] == "directory" else files).append(entry["name"])
    return sorted(dirs), sorted(files)


def _case_id(name: str, where: str) -> tuple[str, str | None, str | None]:
    """``(case id, the original name when it differs, error)`` for a file or folder name."""
    case_id = case_id_for(name)
    try:
        validate_case_id(case_id)
    except ValueError:
        return name, None, f"{where}: {name!r} cannot be made into a case id (no letters or digits left)"
    return case_id, (name if case_id != name else None), None


def detect_layout(fs: Any, root: str) -> str:
    """Guess the layout of ``root`` (a folder or a CSV file)."""
    if fs.isfile(root):
        if root.lower().endswith(".csv"):
            return "generic"
        raise IngestError(f"{root}: a file that is not a CSV; pass a folder or a CSV of image/label paths")
    if not fs.isdir(root):
        raise IngestError(f"{root}: no such folder or CSV file")
    dirs, files = _ls(fs, root)
    if not dirs and not files:
        raise IngestError(f"{root}: empty folder, nothing to ingest")
    names = {d: _name(d).lower() for d in dirs}
    if any(n in ("images", "imagestr") for n in names.values()):
        return "generic"
    niftis = [_name(p) for p in fs.find(root) if _NIFTI.search(p)]
    if not niftis:
        raise IngestError(f"{root}: no NIfTI files (.nii, .nii.gz) found")
    if any(_LITS_VOLUME.match(n) or _LITS_SEG.match(n) for n in niftis):
        return "lits"
    if any(re.search(rf"_({'|'.join(BRATS_MODALITIES)})\.nii(\.gz)?$", n, re.IGNORECASE) for n in niftis):
        return "brats"
    raise IngestError(f"{root}: cannot tell the layout (no BraTS *_flair, LiTS volume-N or images/ folder); "
                      "pass --layout")


def discover(
    fs: Any,
    root: str,
    layout: str,
    *,
    labels_dir: str | None = None,
    label_values: Sequence[int] | None = None,
    require_labels: bool = True,
) -> Discovery:
    """List the cases of ``root`` in ``layout`` (``"auto"`` detects it)."""
    if layout not in LAYOUTS:
        raise IngestError(f"layout: unknown {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(fs, root)
        logger.debug("ingest: %s looks like the %s layout", root, layout)
    elif not fs.exists(root):
        raise IngestError(f"{root}: no such folder or CSV file")
    if layout == "brats":
        found = _discover_brats(fs, root, require_labels)
    elif layout == "lits":
        found = _discover_lits(fs, root, require_labels)
    elif fs.isfile(root):
        found = _discover_csv(fs, root, require_labels)
    else:
        found = _discover_generic_dirs(fs, root, labels_dir, require_labels)
    if label_values is not None:
        found.layout = LayoutInfo(found.layout.name, found.layout.modalities, tuple(sorted({int(v) for v in label_values})),
                                  found.layout.label_meaning, found.layout.zscore_mask)
    if not found.cases:
        raise IngestError(f"{root}: no cases found for the {layout} layout")
    first: dict[str, str] = {}
    cases = []
    for spec in found.cases:
        name = spec.source_name or spec.case_id
        if spec.case_id in first and spec.error is None:
            spec = replace(spec, error=f"{root}: duplicate case id {spec.case_id!r} (from {name!r} and "
                                       f"{first[spec.case_id]!r})")
        first.setdefault(spec.case_id, name)
        cases.append(spec)
    found.cases = cases
    return found


def _discover_brats(fs: Any, root: str, require_labels: bool) -> Discovery:
    info = LayoutInfo("brats", BRATS_MODALITIES, (0, 1, 2, 4), "whole tumour (BraTS labels 1, 2, 4)", "nonzero")
    hidden: list[str] = []
    dirs, _ = _ls(fs, root, hidden)
    cases = []
    for folder in dirs:
        case_id, source_name, error = _case_id(_name(folder), folder)
        _, files = _ls(fs, folder, hidden)
        niftis = [f for f in files if _NIFTI.search(f)]
        if error is None and not files:
            error = f"{folder}: empty folder"
        elif error is None and not niftis:
            error = f"{folder}: no NIfTI files (.nii, .nii.gz)"
        images: list[tuple[str, str]] = []
        used: set[str] = set()
        for mod in BRATS_MODALITIES:
            hits = [f for f in niftis if re.search(rf"_{mod}\.nii(\.gz)?$", _name(f), re.IGNORECASE)]
            if error is None and not hits:
                error = f"{folder}: missing modality {mod} (no *_{mod}.nii[.gz])"
            elif error is None and len(hits) > 1:
                error = f"{folder}: several files for modality {mod}: {', '.join(_name(h) for h in hits)}"
            if hits:
                images.append((mod, hits[0]))
                used.add(hits[0])
        segs = [f for f in niftis if re.search(r"_seg\.nii(\.gz)?$", _name(f), re.IGNORECASE)]
        if not segs:  # BraTS 2020 case 355 ships its label as W39_1998.09.19_Segm.nii
            segs = [f for f in niftis if f not in used and "seg" in _name(f).lower()]
        label = segs[0] if len(segs) == 1 else None
        if error is None and len(segs) > 1:
            error = f"{folder}: several label files: {', '.join(_name(s) for s in segs)}"
        if error is None and label is None and require_labels:
            error = f"{folder}: missing label (no *_seg.nii[.gz])"
        cases.append(CaseSpec(case_id, tuple(images), label, error, source_name))
    return Discovery(info, cases, hidden)


def _discover_lits(fs: Any, root: str, require_labels: bool) -> Discovery:
    info = LayoutInfo("lits", ("ct",), (0, 1, 2), "liver including tumour (LiTS labels 1, 2)", "all")
    volumes: dict[int, list[str]] = {}
    segs: dict[int, list[str]] = {}
    for path in sorted(fs.find(root)):
        name = _name(path)
        if m := _LITS_VOLUME.match(name):
            volumes.setdefault(int(m.group(1)), []).append(path)
        elif m := _LITS_SEG.match(name):
            segs.setdefault(int(m.group(1)), []).append(path)
    cases = []
    for n in sorted(set(volumes) | set(segs)):
        case_id = f"lits-{n:03d}"
        vols, labs = volumes.get(n, []), segs.get(n, [])
        error = None
        if not vols:
            error = f"{labs[0]}: no matching volume-{n}.nii[.gz] (missing image)"
        elif len(vols) > 1 or len(labs) > 1:
            error = f"{root}: several files for case {n}: {', '.join(vols + labs)}"
        elif not labs and require_labels:
            error = f"{vols[0]}: missing label segmentation-{n}.nii[.gz]"
        images = (("ct", vols[0]),) if vols else ()
        cases.append(CaseSpec(case_id, images, labs[0] if labs else None, error))
    return Discovery(info, cases)


def _pick_dir(fs: Any, root: str, names: Sequence[str]) -> str | None:
    for name in names:
        path = posixpath.join(root, name)
        if fs.isdir(path):
            return path
    return None


def _discover_generic_dirs(fs: Any, root: str, labels_dir: str | None, require_labels: bool) -> Discovery:
    images_dir = _pick_dir(fs, root, ("images", "imagesTr"))
    if images_dir is None:
        raise IngestError(f"{root}: generic layout needs an images/ (or imagesTr/) folder, or pass a CSV")
    if labels_dir is not None:
        label_root = source_fs(labels_dir)[1] if "://" in labels_dir else labels_dir
        if not fs.isdir(label_root):
            raise IngestError(f"{labels_dir}: labels folder not found")
    else:
        label_root = _pick_dir(fs, root, ("labels", "labelsTr"))
    hidden: list[str] = []
    _, files = _ls(fs, images_dir, hidden)
    files = [f for f in files if _NIFTI.search(f)]
    if not files:
        raise IngestError(f"{images_dir}: no NIfTI files (.nii, .nii.gz)")
    multichannel = all(_CHANNEL.match(_stem(f)) for f in files)
    channels: dict[str, dict[int, str]] = {}
    for f in files:
        stem = _stem(f)
        if multichannel:
            m = _CHANNEL.match(stem)
            assert m is not None
            channels.setdefault(m.group(1), {})[int(m.group(2))] = f
        else:
            channels.setdefault(stem, {})[0] = f
    n_channels = max(max(chs) for chs in channels.values()) + 1
    modalities = tuple(f"ch{c}" for c in range(n_channels)) if multichannel else ("image",)
    labels: dict[str, str] = {}
    if label_root is not None:
        for f in _ls(fs, label_root, hidden)[1]:
            if _NIFTI.search(f):
                labels[_stem(f)] = f
    elif require_labels:
        raise IngestError(f"{root}: no labels/ folder (pass --labels DIR, or allow unlabelled cases)")
    info = LayoutInfo("generic", modalities, (0, 1), "foreground (label > 0)", "all")
    cases = []
    for stem in sorted(channels):
        chs = channels[stem]
        case_id, source_name, error = _case_id(stem, images_dir)
        missing = [c for c in range(n_channels) if c not in chs]
        if error is None and missing:
            error = f"{images_dir}: case {case_id} is missing modality {modalities[missing[0]]} ({case_id}_{missing[0]:04d})"
        label = labels.get(stem)
        if error is None and label is None and require_labels:
            error = f"{label_root}: no label for case {stem}"
        images = tuple((modalities[c], chs[c]) for c in sorted(chs))
        cases.append(CaseSpec(case_id, images, label, error, source_name))
    for stem in sorted(set(labels) - set(channels)):
        case_id, source_name, _ = _case_id(stem, images_dir)
        cases.append(CaseSpec(case_id, (), labels[stem], f"{labels[stem]}: label without an image in {images_dir}",
                              source_name))
    return Discovery(info, cases, hidden)


def _discover_csv(fs: Any, path: str, require_labels: bool) -> Discovery:
    with fs.open(path, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
        fh.seek(0)
        header = next(csv.reader(fh), [])
    header = [h.strip() for h in header]
    channel_cols = [h for h in header if h == "image" or h.startswith("image_")]
    if not channel_cols:
        raise IngestError(f"{path}: no image column (expected 'image' or 'image_<modality>' columns)")
    if "label" not in header and require_labels:
        raise IngestError(f"{path}: no 'label' column")
    modalities = tuple(h[len("image_"):] if h.startswith("image_") else "image" for h in channel_cols)
    base = posixpath.dirname(path)
    info = LayoutInfo("generic", modalities, (0, 1), "foreground (label > 0)", "all")

    def resolve(p: str) -> str:
        p = p.strip()
        return p if "://" in p or p.startswith("/") else posixpath.normpath(posixpath.join(base, p))

    cases = []
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        first = next((row[c] for c in channel_cols if row.get(c)), "")
        case_id, source_name, error = _case_id(row.get("case_id") or (_stem(first) if first else f"row{i}"),
                                               f"{path} line {i}")
        images = []
        for col, mod in zip(channel_cols, modalities):
            if row.get(col):
                images.append((mod, resolve(row[col])))
            elif error is None:
                error = f"{path} line {i}: missing modality {mod} (empty {col} column)"
        label = resolve(row["label"]) if row.get("label") else None
        if error is None and label is None and require_labels:
            error = f"{path} line {i}: missing label path"
        cases.append(CaseSpec(case_id, tuple(images), label, error, source_name))
    return Discovery(info, cases)


# --------------------------------------------------------------------------------------------
# Split files
# --------------------------------------------------------------------------------------------

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


def _split_name(name: str, where: str) -> str:
    key = name.strip().rstrip(":").lower()
    if key not in _SPLIT_NAMES or _SPLIT_NAMES[key] not in SPLITS:
        raise IngestError(f"{where}: unknown split name {name!r} (use train, val or test)")
    return _SPLIT_NAMES[key]


def parse_split_file(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Read a split file into case id -> split (``train`` / ``val`` / ``test``).

    Accepted formats:
        * JSON ``{"train": [...], "val": [...]}`` or ``{"case_id": "train", ...}``;
        * CSV with a ``case_id`` (or ``id``) and a ``split`` column;
        * text as in the reference BraTS split: ``Training:`` / ``Validation:`` headers, one id
          per line below each.
    """
    fs, p = source_fs(path, storage_options)
    if not fs.isfile(p):
        raise IngestError(f"{path}: split file not found")
    with fs.open(p, "rt") as fh:
        text = fh.read()
    out: dict[str, str] = {}
    try:
        if p.lower().endswith(".json"):
            data = json.loads(text)
            if not isinstance(data, dict):
                raise IngestError(f"{path}: expected a JSON object")
            for key, value in data.items():
                if isinstance(value, list):
                    split = _split_name(key, path)
                    out.update({str(cid): split for cid in value})
                else:
                    out[str(key)] = _split_name(str(value), path)
        elif p.lower().endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(text)))
            for i, row in enumerate(rows, start=2):
                cid = (row.get("case_id") or row.get("id") or "").strip()
                if not cid or not row.get("split"):
                    raise IngestError(f"{path} line {i}: need case_id and split columns")
                out[cid] = _split_name(row["split"], f"{path} line {i}")
        else:
            current = None
            for i, line in enumerate(text.splitlines(), start=1):
                token = line.strip()
                if not token or token.startswith("#"):
                    continue
                if token.endswith(":"):
                    current = _split_name(token, f"{path} line {i}")
                elif current is None:
                    raise IngestError(f"{path} line {i}: case id before any 'Training:'/'Validation:' header")
                else:
                    out[token] = current
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}: invalid JSON ({exc})") from exc
    if not out:
        raise IngestError(f"{path}: split file lists no cases")
    return out


__all__ = [
    "BRATS_MODALITIES",
    "CaseSpec",
    "Discovery",
    "IngestError",
    "LAYOUTS",
    "LayoutInfo",
    "detect_layout",
    "discover",
    "parse_split_file",
    "source_fs",
]
