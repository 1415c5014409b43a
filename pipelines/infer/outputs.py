"""Outputs of an inference job: where files go, the Zarr copy, the report, resume.

Layout of the output folder (local path or fsspec URL)::

    masks/<case_id>.nii.gz          uint8 {0, 1}, the scan's own shape, affine and qform/sform codes
    probabilities/<case_id>.nii.gz  float32 in [0, 1] (``save_probabilities``)
    predictions.zarr/<case_id>/     mask (+ probability) arrays and the affine (``save_zarr``)
    report.parquet, report.csv      one row per case (``ossnet_pipelines.infer.job.REPORT_COLUMNS``)

Atomicity: every file is streamed into a hidden temporary file and moved into place when
complete (``ossnet_pipelines.files.atomic_write``; NIfTI files by ``ossnet_pipelines.nifti.write_volume``). A
killed job leaves at most temporary files, which the next run removes (``remove_stale_temps``)
before it starts: one job per output folder. A Zarr case group is published by a
``complete: true`` attribute written last.

Resume (``plan_cases``): a case is done when the previous report says ok (or skipped) for the same
model checkpoint and every requested output of it exists; everything else is redone.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np

from ossnet_pipelines.files import TMP_SUFFIX, atomic_write_bytes, remove_stale_temps
from ossnet_pipelines.infer.job import REPORT_COLUMNS, CaseResult

logger = logging.getLogger(__name__)

DONE_STATUSES = ("ok", "skipped")


@dataclass(frozen=True)
class OutputLayout:
    """Where a job writes (see the module docstring). Picklable; URLs only."""

    root: str
    storage_options: Mapping[str, Any] | None = None

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def masks(self) -> str:
        return self._join("masks")

    @property
    def probabilities(self) -> str:
        return self._join("probabilities")

    @property
    def zarr(self) -> str:
        return self._join("predictions.zarr")

    @property
    def report_parquet(self) -> str:
        return self._join("report.parquet")

    @property
    def report_csv(self) -> str:
        return self._join("report.csv")

    def mask(self, case_id: str) -> str:
        return self._join("masks", f"{case_id}.nii.gz")

    def probability(self, case_id: str) -> str:
        return self._join("probabilities", f"{case_id}.nii.gz")

    def target_masks(self, target: str) -> str:
        return self._join("targets", target)

    def target_mask(self, target: str, case_id: str) -> str:
        return self._join("targets", target, f"{case_id}.nii.gz")

    def prepare(self, save_probabilities: bool, save_zarr: bool, target_names: Sequence[str] = ()) -> None:
        """Create the folders (and the Zarr root group) and remove stale temporary files;
        ``target_names``: the per-target mask folders to create."""
        fs, root = fsspec.core.url_to_fs(self.root, **dict(self.storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        folders = [self.root, self.masks] + ([self.probabilities] if save_probabilities else [])
        folders += [self.target_masks(name) for name in target_names]
        for url in folders[1:]:
            fs.makedirs(fsspec.core.url_to_fs(url, **dict(self.storage_options or {}))[1], exist_ok=True)
        if "file" in _protocols(fs):
            _refuse_links_outside(root, [fsspec.core.url_to_fs(u)[1] for u in folders[1:]]
                                  + ([fsspec.core.url_to_fs(self.zarr)[1]] if save_zarr else []))
        remove_stale_temps(folders, self.storage_options)
        if save_zarr:
            import zarr

            from ossnet_pipelines.store import zarr_store

            zarr.open_group(zarr_store(self.zarr, storage_options=self.storage_options), mode="a",
                            attributes={"ossnet_predictions": {"format_version": 1}})

    def existing(self, folder: str) -> set[str]:
        """Case ids with a ``<case_id>.nii.gz`` in ``folder`` (one listing, not one call per case)."""
        fs, path = fsspec.core.url_to_fs(folder, **dict(self.storage_options or {}))
        if not fs.isdir(path):
            return set()
        names = (posixpath.basename(p) for p in fs.ls(path, detail=False))
        return {n[: -len(".nii.gz")] for n in names if n.endswith(".nii.gz") and not n.startswith(".")}

    def complete_zarr_cases(self) -> set[str]:
        """Case ids whose group in ``predictions.zarr`` is published (``complete: true``)."""
        import zarr

        from ossnet_pipelines.store import zarr_store

        try:
            root = zarr.open_group(zarr_store(self.zarr, storage_options=self.storage_options), mode="r")
        except Exception:  # no copy yet
            return set()
        return {name for name, node in root.members(max_depth=0)
                if isinstance(node, zarr.Group) and node.attrs.get("complete") is True}

    def done_outputs(self, save_probabilities: bool, save_zarr: bool, target_names: Sequence[str] = ()) -> set[str]:
        """Case ids for which every requested output exists."""
        done = self.existing(self.masks)
        for name in target_names:
            done &= self.existing(self.target_masks(name))
        if save_probabilities:
            done &= self.existing(self.probabilities)
        if save_zarr:
            done &= self.complete_zarr_cases()
        return done


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _refuse_links_outside(root: str, folders: Sequence[str]) -> None:
    """Refuse output sub-folders that are symbolic links leading outside the output folder.

    Files are safe without this: each is written to a temporary name and renamed, which
    replaces a link rather than writing through it. A linked folder would send every case there.

    Raises:
        InferError: naming the folder and where it leads.
    """
    import os

    from ossnet_pipelines.infer.job import InferError

    real_root = os.path.realpath(root)
    for folder in folders:
        real = os.path.realpath(folder)
        if os.path.commonpath([real_root, real]) != real_root:
            raise InferError(f"{folder}: a symbolic link leading outside the output folder (to {real}); "
                             "remove it or choose another --output")


def write_zarr_case(layout: OutputLayout, case_id: str, mask: Any, probability: Any | None,
                    attrs: Mapping[str, Any]) -> None:
    """Write one case's group into ``predictions.zarr``; published by ``complete: true`` last.

    Args:
        mask: ``(X, Y, Z)`` uint8 in the scan's geometry (NumPy, or dask: stored chunk by chunk).
        probability: ``(X, Y, Z)`` float32 or None (likewise).
        attrs: JSON-compatible metadata (affine, source, model).
    """
    import dask.array as da
    import zarr
    from zarr.codecs import BloscCodec

    from ossnet_pipelines.store import zarr_store

    root = zarr.open_group(zarr_store(layout.zarr, storage_options=layout.storage_options), mode="a")
    group = root.create_group(case_id, overwrite=True, attributes={"complete": False})
    chunks = tuple(min(64, int(s)) for s in mask.shape)
    for name, data, dtype, shuffle in (("mask", mask, np.uint8, "bitshuffle"),
                                       ("probability", probability, np.float32, "shuffle")):
        if data is None:
            continue
        array = group.create_array(name, shape=tuple(data.shape), dtype=dtype, chunks=chunks,
                                   compressors=BloscCodec(cname="zstd", clevel=3, shuffle=shuffle))
        # One task per Zarr chunk: no two tasks write the same chunk.
        da.store(da.asarray(data).astype(dtype).rechunk(chunks), array, lock=False)
    group.attrs.put({**dict(attrs), "case_id": case_id, "complete": True})


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def report_frame(rows: Iterable[CaseResult]) -> Any:
    """The report as a pandas DataFrame in ``REPORT_COLUMNS`` order, sorted by case id; for
    multi-target models followed by ``dice_<target>``, ``iou_<target>``, ``hd95_<target>`` and the
    voxel counts ``tp_/fp_/fn_<target>`` (the ``targets`` JSON, expanded)."""
    import pandas as pd

    records = sorted((r.to_row() for r in rows), key=lambda r: r["case_id"])
    frame = pd.DataFrame.from_records(records, columns=list(REPORT_COLUMNS))
    floats = ("seconds", "predict_seconds", "foreground_ml", "dice", "iou")
    frame = frame.astype({**{c: "float64" for c in floats}, "n_queries": "int64"})
    expanded = [json.loads(r["targets"]) if r["targets"] else {} for r in records]
    if any(expanded):
        frame = pd.concat([frame, pd.DataFrame.from_records(expanded).astype("float64")], axis=1)
    return frame


def write_report(layout: OutputLayout, rows: Iterable[CaseResult]) -> str:
    """Write ``report.parquet`` and ``report.csv`` atomically; returns the Parquet URL."""
    frame = report_frame(rows)

    def parquet() -> bytes:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()

    atomic_write_bytes(layout.report_parquet, parquet, layout.storage_options)
    atomic_write_bytes(layout.report_csv, lambda: frame.to_csv(index=False).encode(), layout.storage_options)
    return layout.report_parquet


def read_report(layout: OutputLayout) -> dict[str, CaseResult]:
    """The previous run's rows by case id (empty when there is no readable report)."""
    import pandas as pd

    fs, path = fsspec.core.url_to_fs(layout.report_parquet, **dict(layout.storage_options or {}))
    if not fs.isfile(path):
        return {}
    try:
        with fs.open(path, "rb") as fh:
            frame = pd.read_parquet(fh)
    except Exception as exc:  # unreadable: redo everything rather than trust it
        logger.warning("infer: ignoring unreadable report %s (%s)", layout.report_parquet, exc)
        return {}
    rows = {}
    for record in frame.to_dict(orient="records"):
        if record.get("case_id"):
            result = CaseResult.from_row(record)
            rows[result.case_id] = result
    return rows


@dataclass(frozen=True)
class Plan:
    """What a run does with each listed case.

    Attributes:
        todo: case ids to process.
        skipped: rows of cases a previous run finished (status "skipped", earlier figures kept).
        redo_reasons: case id -> why a previously reported case is processed again.
    """

    todo: tuple[str, ...]
    skipped: tuple[CaseResult, ...]
    redo_reasons: Mapping[str, str]


def plan_cases(case_ids: Sequence[str], previous: Mapping[str, CaseResult], outputs_done: set[str],
               model_sha256: str, overwrite: bool = False) -> Plan:
    """Decide which cases to skip: previous status ok/skipped, same model, all outputs present.

    Args:
        case_ids: the listed (processable) cases.
        previous: the previous report's rows by case id.
        outputs_done: case ids whose requested outputs all exist.
        model_sha256: this run's checkpoint digest.
        overwrite: redo everything.
    """
    todo: list[str] = []
    skipped: list[CaseResult] = []
    reasons: dict[str, str] = {}
    for cid in case_ids:
        prev = previous.get(cid)
        why = None
        if overwrite:
            why = "overwrite"
        elif prev is None:
            why = None if cid not in outputs_done else "no report row (interrupted run)"
        elif prev.status not in DONE_STATUSES:
            why = f"previous status {prev.status}"
        elif prev.model_sha256 != model_sha256:
            why = "another model"
        elif cid not in outputs_done:
            why = "output missing"
        if prev is not None and why is None:
            skipped.append(CaseResult(**{**prev.to_row(), "status": "skipped", "error": ""}))
        else:
            todo.append(cid)
            if why is not None:
                reasons[cid] = why
    return Plan(tuple(todo), tuple(skipped), reasons)


__all__ = [
    "DONE_STATUSES",
    "OutputLayout",
    "Plan",
    "TMP_SUFFIX",
    "atomic_write_bytes",
    "plan_cases",
    "read_report",
    "remove_stale_temps",
    "report_frame",
    "write_report",
    "write_zarr_case",
]
