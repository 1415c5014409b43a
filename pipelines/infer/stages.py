"""The three per-case stages of the inference pipeline; each never raises for a bad case.

``read_case`` (CPU task): read the scan (NIfTI files, local or fsspec, or a Zarr store case),
validate it and bring it onto the model grid with the model's own spec (``ossnet_pipelines.volumes``:
reorient, resample, crop/pad, z-score, slab by slab) -> the ``(C, X', Y', Z')`` grid volume
plus its ``PreprocessRecord``.

``CasePredictor`` (actor, GPU when there is one): the model is loaded once per actor; each
case is segmented by ``ossnet.inference.Inferer`` -> the grid probability map.

``write_case`` (CPU task): map the probability back through the exact inverse
(``PreprocessRecord.to_original``, linear resampling, then the threshold: the scan's orientation,
shape and affine), stream the outputs slab by slab into atomically written files, compute the
foreground volume and, when a reference label exists, Dice/IoU in the scan's geometry, chunk by
chunk -> one report row. Memory is bounded by the model grid and a few slabs, not the scan.

Why three stages and not one actor doing everything: decompressing NIfTI files, z-scoring,
gzip-compressing outputs and reading reference labels are CPU work that would leave the GPU idle
for a large part of each case (a BraTS case spends about as long in ``.nii.gz`` I/O as a GPU
needs for low-res-start MISE). As separate CPU stages they overlap with prediction. The price is
that the grid volume passes through the object store once (read -> actor) and the grid mask once
(actor -> write); probability maps travel only when they are requested.

Where there is nothing to overlap, nothing is shipped: on a CPU-only cluster the read stage and
the predictor ask for the same resources (1 CPU, no GPU), so Ray Data fuses ``read_case`` into
the actor (``ActorPoolMapOperator[Map(read_case)->MapBatches(CasePredictor)]``) and the grid
volume never leaves the process that predicts it. With GPU actors (or ``cpus_per_actor != 1``)
the resources differ, fusion does not apply and reads run as CPU tasks ahead of the GPU.

Rows between stages are plain dicts of NumPy arrays and strings (one case per row). A failure
becomes ``status = "failed"`` with a one-line ``error`` and travels on to the report, so one bad
case never stops the Ray pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ossnet.targets import BINARY, TargetSpec

from ossnet_pipelines.infer.cases import InferCase
from ossnet_pipelines.infer.job import CaseResult
from ossnet_pipelines import nifti, volumes
from ossnet_pipelines.files import local_files
from ossnet_pipelines.infer.outputs import OutputLayout, write_zarr_case
from ossnet_pipelines.nifti import one_line

logger = logging.getLogger(__name__)

READY, FAILED = "ready", "failed"
_EMPTY_F32 = np.zeros((0, 0, 0), dtype=np.float32)


@dataclass(frozen=True)
class StageContext:
    """What the stages need besides the row (small and picklable).

    Attributes:
        modalities: the model's channel names, in its order.
        volume_shape: the model grid.
        zscore_mask: the model's z-score mask ("nonzero" or "all").
        outputs: the output layout.
        save_probabilities, save_zarr: optional outputs.
        model, model_sha256: the resolved model and its checkpoint digest (report columns).
        source_options: fsspec options for the inputs.
        affine_atol: tolerance (mm) between the affines of a case's files.
        store_url: Zarr input store, if any.
        store_channels: store channel index per model channel (Zarr input).
        resample, target_spacing: the model's resampling (its ``PreprocessSpec``).
        threshold: the model's decision threshold on the probability.
        threads: dask threads per case for reading and writing scans.
        targets: the model's target map; multi-target models write the label map in the
            source's convention and score every target.
        save_target_masks: also write each target's region as its own mask.
    """

    modalities: tuple[str, ...]
    volume_shape: tuple[int, int, int]
    zscore_mask: str
    outputs: OutputLayout
    save_probabilities: bool = False
    save_zarr: bool = False
    model: str = ""
    model_sha256: str = ""
    source_options: Mapping[str, Any] | None = None
    affine_atol: float = 1e-3
    store_url: str | None = None
    store_channels: tuple[int, ...] = ()
    resample: str = "none"
    target_spacing: tuple[float, float, float] | None = None
    threshold: float = 0.5
    threads: int = 1
    targets: TargetSpec = BINARY
    save_target_masks: bool = False


def case_item(case: InferCase) -> dict[str, Any]:
    """The pipeline's input row for a case (strings only)."""
    return {"case_id": case.case_id, "kind": case.kind, "images": json.dumps([list(i) for i in case.images]),
            "label": case.label or ""}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value.item() if hasattr(value, "item") else value)


def _failed(row: Mapping[str, Any], error: str, seconds: float) -> dict[str, Any]:
    return {"case_id": _text(row["case_id"]), "label": _text(row.get("label", "")), "status": FAILED,
            "error": one_line(error), "seconds": float(seconds), "meta": "{}"}


def _failure_message(exc: BaseException, where: str) -> str:
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"{where}: out of memory ({type(exc).__name__}: {one_line(exc)[:300]})"
    if isinstance(exc, ValueError):  # the validators' and readers' messages name the file
        return str(exc)
    return f"{where}: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# Stage 1: read + preprocess
# --------------------------------------------------------------------------------------------


def _read_nifti(images: Sequence[tuple[str, str]], ctx: StageContext) -> tuple[np.ndarray, Any, tuple[int, int]]:
    import contextlib

    paths = [p for _, p in images]
    with local_files(paths, ctx.source_options) as local, contextlib.ExitStack() as stack:
        readable = {p: stack.enter_context(nifti.seekable(local[p], p)) for p in paths}
        imgs = {p: nifti.load(readable[p], p) for p in paths}
        shape, affine = nifti.check_case(imgs, {p: p for p in paths}, ctx.affine_atol)
        record = volumes.case_record(shape, affine, ctx.volume_shape, ctx.zscore_mask, ctx.resample,
                                     ctx.target_spacing, name=paths[0])
        with volumes.compute_options("threads", ctx.threads):
            lazy, record = volumes.image_grid([(nifti.lazy_volume(imgs[p], p), p) for p in paths], record)
            grid = np.ascontiguousarray(lazy.compute(), dtype=np.float32)
        codes = nifti.header_codes(imgs[paths[0]])
    return grid, record, codes


def _read_store(case_id: str, ctx: StageContext) -> tuple[np.ndarray, Any, tuple[int, int]]:
    from ossnet.preprocess import validate_finite
    from ossnet_pipelines.store import open_store

    assert ctx.store_url is not None
    store = open_store(ctx.store_url, "r", ctx.source_options)
    record = store.record(case_id)
    image = store.read_case(case_id, ("image",))["image"]
    grid = np.ascontiguousarray(image[list(ctx.store_channels)], dtype=np.float32)
    validate_finite(grid, f"{ctx.store_url}: case {case_id} image")
    return grid, record, (1, 1)


def read_case(item: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage 1: read and preprocess one case.

    Returns:
        The row with ``status`` "ready", ``image`` ``(C, X', Y', Z')`` float32 on the model grid
        and ``meta`` (JSON: the ``PreprocessRecord`` and the NIfTI qform/sform codes); or
        ``status`` "failed" with ``error``.
    """
    t0 = time.perf_counter()
    case_id = _text(item["case_id"])
    try:
        if _text(item["kind"]) == "zarr":
            grid, record, codes = _read_store(case_id, ctx)
        else:
            grid, record, codes = _read_nifti([tuple(p) for p in json.loads(_text(item["images"]))], ctx)
    except Exception as exc:  # any bad input stays this case's problem
        if not isinstance(exc, (ValueError, OSError, MemoryError)):
            logger.warning("infer: reading %s failed unexpectedly", case_id, exc_info=True)
        return {**_failed(item, _failure_message(exc, case_id), time.perf_counter() - t0), "image": _EMPTY_F32[None]}
    meta = {"record": record.to_dict(), "sform_code": codes[0], "qform_code": codes[1]}
    return {"case_id": case_id, "label": _text(item.get("label", "")), "status": READY, "error": "",
            "seconds": time.perf_counter() - t0, "meta": json.dumps(meta), "image": grid}


# --------------------------------------------------------------------------------------------
# Stage 2: predict (actor)
# --------------------------------------------------------------------------------------------


def _stack(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, np.ndarray) for v in values):
        if len({v.shape for v in values}) == 1:
            return np.stack(values)
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


class CasePredictor:
    """Callable class for ``map_batches``: one model per actor, one case per call.

    Args:
        checkpoint: the checkpoint file's bytes, or a one-element list holding an ``ObjectRef``
            to them (so every actor, on any node, gets the model through the object store).
        mode: "auto" (the model's default: low-res-start MISE with a low-res head, else
            dense-start MISE), "dense", "mise" or "mise_lowres".
        chunk_points: points per decoder pass (bounds memory).
        threads: torch CPU threads when there is no GPU.
        recall_margin: MISE's recall margin in logits (None: ``ossnet.inference``'s default).
    """

    def __init__(self, checkpoint: bytes | list[Any], mode: str = "auto", chunk_points: int = 2**14,
                 threads: int = 1, recall_margin: float | None = None) -> None:
        import torch

        from ossnet.checkpoint import load_checkpoint
        from ossnet_pipelines.tracking.predict import make_inferer

        if not isinstance(checkpoint, (bytes, bytearray)):
            import ray

            checkpoint = ray.get(checkpoint[0])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.model, info = load_checkpoint(io.BytesIO(bytes(checkpoint)), map_location=self.device)
        self.inferer = make_inferer(self.model, mode=None if mode == "auto" else mode, device=self.device,
                                    chunk_points=int(chunk_points), threshold=float(info.preprocess.threshold),
                                    recall_margin=recall_margin)
        logger.info("infer: predictor ready on %s (variant %s, mode %s, %d points per pass)", self.device,
                    self.model.config.variant, self.inferer.mode, self.inferer.chunk_points)

    def _release(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def predict_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Segment the row's grid volume; the image is dropped, the grid probability added (the
        write stage thresholds it after mapping it back, so masks and probabilities agree)."""
        base = {k: row[k] for k in ("case_id", "label", "status", "error", "seconds", "meta")}
        empty = {"probability": _EMPTY_F32, "n_queries": 0, "mode": "", "predict_seconds": 0.0}
        if _text(row["status"]) != READY:
            return {**base, **empty}
        t0 = time.perf_counter()
        try:
            result = self.inferer(self.model, np.asarray(row["image"], dtype=np.float32))
        except Exception as exc:  # CUDA/CPU out of memory, bad shapes: this case only
            message = _failure_message(exc, f"{_text(row['case_id'])}: predict on {self.device} "
                                             f"(chunk_points={self.inferer.chunk_points})")
            self._release()
            return {**_failed(row, message, float(row["seconds"]) + time.perf_counter() - t0), **empty}
        return {**base, "seconds": float(row["seconds"]) + time.perf_counter() - t0,
                "probability": np.asarray(result.probability, dtype=np.float32),
                "n_queries": int(result.n_queries), "mode": str(result.mode), "predict_seconds": float(result.seconds)}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["case_id"])
        outs = [self.predict_row({k: batch[k][i] for k in batch}) for i in range(n)]
        return {k: _stack([o[k] for o in outs]) for k in outs[0]}


# --------------------------------------------------------------------------------------------
# Stage 3: undo preprocessing + write + metrics
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reference(case_id: str, label: str, record: Any, ctx: StageContext) -> Iterator[Any]:
    """The reference label on the scan's grid, lazy (the source's values), while its file is open."""
    if label == "store":
        from ossnet_pipelines.store import open_store

        grid = open_store(str(ctx.store_url), "r", ctx.source_options).read_case(case_id, ("label",))["label"]
        yield volumes.scan_view(np.asarray(grid), record, order=0)
        return
    with local_files([label], ctx.source_options) as local, contextlib.ExitStack() as stack:
        img = nifti.load(stack.enter_context(nifti.seekable(local[label], label)), label)
        nifti.check_same_grid(img, label, "label", record.original_shape, record.original_affine, "the image",
                              ctx.affine_atol)
        ref = nifti.lazy_volume(img, label, dtype=None)
        if np.issubdtype(ref.dtype, np.floating):  # checked in the same pass that counts
            ref = ref.map_blocks(_finite_block, label, dtype=ref.dtype)
        yield ref


def _reference_counts(case_id: str, label: str, record: Any, mask: Any, ctx: StageContext) -> Any:
    """Confusion counts of the scan-geometry mask against the reference label, chunk by chunk."""
    with _reference(case_id, label, record, ctx) as ref:
        return volumes.mask_counts(mask, ref > 0)


def _finite_block(block: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(block).all():
        raise nifti.NiftiError(f"{name}: non-finite voxels (NaN or Inf)")
    return block


def write_case(row: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage 3: map the grid prediction back to the scan and write it; returns the report row."""
    from ossnet.metrics import dice_of, iou_of
    from ossnet.preprocess import PreprocessRecord

    t0 = time.perf_counter()
    case_id = _text(row["case_id"])
    seconds = float(row["seconds"])
    common = {"case_id": case_id, "mode": _text(row.get("mode", "")), "model": ctx.model,
              "model_sha256": ctx.model_sha256, "n_queries": int(row.get("n_queries", 0)),
              "predict_seconds": float(row.get("predict_seconds", 0.0))}
    if _text(row["status"]) != READY:
        return CaseResult(status="failed", error=_text(row["error"]), seconds=seconds, **common).to_row()
    with volumes.compute_options("threads", ctx.threads):
        try:
            meta = json.loads(_text(row["meta"]))
            record = PreprocessRecord.from_dict(meta["record"])
            affine = np.asarray(record.original_affine, dtype=np.float64)
            grid_probability = np.asarray(row["probability"], dtype=np.float32)
            codes = {"sform_code": int(meta.get("sform_code", 1)), "qform_code": int(meta.get("qform_code", 1))}
            multi = grid_probability.ndim == 4
            if multi:  # several targets: the label map in the source's values
                regions = [volumes.scan_mask(p, record, ctx.threshold) for p in grid_probability]
                mask = scan_label_map(regions, ctx.targets)
                if ctx.save_target_masks:
                    for name, region in zip(ctx.targets.names, regions):
                        nifti.write_volume(ctx.outputs.target_mask(name, case_id), region, affine, dtype=np.uint8,
                                           **codes, storage_options=ctx.outputs.storage_options)
            else:
                mask = volumes.scan_mask(grid_probability, record, ctx.threshold)
            n_foreground = nifti.write_volume(ctx.outputs.mask(case_id), mask, affine, dtype=np.uint8, **codes,
                                              storage_options=ctx.outputs.storage_options)
            probability = None
            if ctx.save_probabilities:
                probability = volumes.scan_view(grid_probability, record, order=1)
                nifti.write_volume(ctx.outputs.probability(case_id), probability, affine, dtype=np.float32, **codes,
                                   storage_options=ctx.outputs.storage_options)
            if ctx.save_zarr:
                write_zarr_case(ctx.outputs, case_id, mask, probability,
                                {"affine": affine.tolist(), "model": ctx.model, "model_sha256": ctx.model_sha256})
            voxel_ml = float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
            foreground = n_foreground * voxel_ml
        except Exception as exc:  # a failed write fails this case only
            if not isinstance(exc, (ValueError, OSError, MemoryError)):
                logger.warning("infer: writing %s failed unexpectedly", case_id, exc_info=True)
            return CaseResult(status="failed", error=one_line(_failure_message(exc, f"{case_id}: write")),
                              seconds=seconds + time.perf_counter() - t0, **common).to_row()
        d = j = float("nan")
        note = ""
        per_target = ""
        label = _text(row.get("label", ""))
        if label:
            try:
                if multi:
                    scores = _target_reference_scores(case_id, label, record, mask, ctx)
                    per_target = json.dumps(scores)
                    d = float(np.mean([scores[f"dice_{n}"] for n in ctx.targets.names]))
                    j = float(np.mean([scores[f"iou_{n}"] for n in ctx.targets.names]))
                else:
                    counts = _reference_counts(case_id, label, record, mask, ctx)
                    d, j = dice_of(counts), iou_of(counts)
            except Exception as exc:  # the prediction stands; only the metric is missing
                note = one_line(f"reference label: {_failure_message(exc, label)}")
    return CaseResult(status="ok", error=note, seconds=seconds + time.perf_counter() - t0,
                      foreground_ml=float(foreground), dice=float(d), iou=float(j), mask=ctx.outputs.mask(case_id),
                      targets=per_target, **common).to_row()


#: Scans up to this many voxels get HD95 per target in the report (it needs whole masks in memory).
HD95_MAX_VOXELS = 2**25


def scan_label_map(regions: Sequence[Any], targets: TargetSpec) -> Any:
    """The lazy label map (uint8, the source's values) of lazy per-target scan masks."""
    import dask.array as da

    return da.map_blocks(lambda *blocks: targets.label_map(np.stack(blocks)), *regions, dtype=np.uint8)


def _target_reference_scores(case_id: str, label: str, record: Any, label_map: Any,
                             ctx: StageContext) -> dict[str, float]:
    """``ossnet.metrics.target_scores`` of the written label map against the reference (Dice, IoU,
    HD95 in mm, the counts that pool into a global Dice) for scans up to ``HD95_MAX_VOXELS``;
    larger scans get the same without HD95, counted slab by slab in one pass."""
    import dask
    import dask.array as da

    from ossnet.geometry import voxel_spacing
    from ossnet.metrics import count_scores, target_scores

    targets = ctx.targets
    with _reference(case_id, label, record, ctx) as lazy:
        ref = da.asarray(lazy)
        if int(np.prod(ref.shape, dtype=np.int64)) <= HD95_MAX_VOXELS:
            written, truth = dask.compute(da.asarray(label_map), ref)
            targets.check_values(truth, what=label)
            return target_scores(written, truth, targets, voxel_spacing(record.original_affine))
        targets.check_values(da.unique(ref).compute(), what=label)
        pairs = [(da.asarray(label_map).map_blocks(np.isin, list(region), dtype=bool),
                  ref.map_blocks(np.isin, list(region), dtype=bool)) for region in targets.regions]
        out: dict[str, float] = {}
        for name, counts in zip(targets.names, volumes.mask_counts_many(pairs)):
            out.update(count_scores(name, counts))
        return out


def process_case(case: InferCase, ctx: StageContext, predictor: CasePredictor) -> CaseResult:
    """All three stages in this process (no Ray): for tests and single-case use."""
    return CaseResult.from_row(write_case(predictor.predict_row(read_case(case_item(case), ctx)), ctx))


__all__ = ["CasePredictor", "StageContext", "case_item", "process_case", "read_case", "write_case"]
