"""ossnet_pipelines.infer without Ray: case listing, per-case stages, atomic writes, report, resume, CLI."""

from __future__ import annotations

import argparse
import gzip
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ossnet.checkpoint import PreprocessSpec, checkpoint_bytes
from ossnet.config import model_config
from ossnet.inference import Inferer
from ossnet.model import build_model
from ossnet.preprocess import preprocess_image
from ossnet_pipelines.infer import CaseResult, InferError, InferJob, InferReport
from ossnet_pipelines.infer.job import REPORT_COLUMNS
from ossnet_pipelines.infer.cases import InferCase, list_cases, map_modalities, safe_case_id
from ossnet_pipelines.infer.cli import configure_infer_parser, job_from_args
from ossnet_pipelines.infer.outputs import (
    TMP_SUFFIX,
    OutputLayout,
    atomic_write_bytes,
    plan_cases,
    read_report,
    remove_stale_temps,
    write_report,
)
from ossnet_pipelines.infer.stages import CasePredictor, StageContext, case_item, process_case, read_case

GRID = (20, 18, 14)
# LPS-like, axes permuted, anisotropic, shifted origin: the mask must come back in this geometry.
AFFINE = np.array([[0.0, -1.2, 0.0, 40.0], [-0.9, 0.0, 0.0, 30.0], [0.0, 0.0, 1.5, -10.0], [0.0, 0.0, 0.0, 1.0]])
BRATS = ("flair", "t1", "t1ce", "t2")


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _scan(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(300.0, 40.0, size=shape).astype(np.float32)
    c = np.array(shape) / 2
    g = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    x[sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < (min(shape) / 3) ** 2] += 200.0
    x[:2] = 0.0
    return x


@pytest.fixture(scope="module")
def tiny_model() -> tuple[torch.nn.Module, bytes, PreprocessSpec]:
    torch.manual_seed(0)
    cfg = model_config("C", "tiny", in_channels=1, volume_shape=GRID)
    model = build_model(cfg).eval()
    spec = PreprocessSpec(modalities=("t1",), volume_shape=GRID)
    return model, checkpoint_bytes(model, spec), spec


def _ctx(spec: PreprocessSpec, out: Path, **kw) -> StageContext:
    layout = OutputLayout(str(out))
    layout.prepare(kw.get("save_probabilities", False), kw.get("save_zarr", False))
    return StageContext(modalities=spec.modalities, volume_shape=spec.volume_shape, zscore_mask=spec.zscore_mask,
                        outputs=layout, model="models:/m/1", model_sha256="abc", **kw)


# ------------------------------------------------------------------------------ case listing


def test_flat_folder_glob_and_single_file_listing(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    _save(src / "Patient 01.nii.gz", _scan((9, 8, 7), 0))
    _save(src / "b.nii", _scan((9, 8, 7), 1))
    _save(src / ".hidden.nii.gz", _scan((9, 8, 7), 2))
    (src / "notes.txt").write_text("not a scan")
    _save(src / "out" / "masks" / "b.nii.gz", _scan((9, 8, 7), 3))  # our own output: never an input
    _save(tmp_path / "refs" / "b.nii", np.zeros((9, 8, 7), np.uint8))

    listing = list_cases(str(src), ("t1",), labels=str(tmp_path / "refs"), exclude=str(src / "out"))
    assert listing.layout == "nifti"
    assert [c.case_id for c in listing.cases] == ["Patient_01", "b"]
    by_id = {c.case_id: c for c in listing.cases}
    assert by_id["b"].images == (("t1", str(src / "b.nii")),)  # named after the model's channel
    assert by_id["b"].label == str(tmp_path / "refs" / "b.nii") and by_id["Patient_01"].label is None

    globbed = list_cases(str(src / "**" / "*.nii.gz"), ("t1",), exclude=str(src / "out"))
    assert [c.case_id for c in globbed.cases] == ["Patient_01"]
    single = list_cases(str(src / "b.nii"), ("t1",))
    assert [c.case_id for c in single.cases] == ["b"]

    with pytest.raises(InferError, match="1 channel.*model takes 4"):
        list_cases(str(src), BRATS)
    with pytest.raises(InferError, match="no such file"):
        list_cases(str(tmp_path / "missing"), ("t1",))
    assert safe_case_id("../a b") == "a_b"


def test_brats_folders_feed_channels_in_the_model_order(tmp_path: Path) -> None:
    for case in ("c1", "c2"):
        for m in BRATS:
            if case == "c2" and m == "t2":
                continue
            _save(tmp_path / case / f"{case}_{m}.nii.gz", _scan((9, 8, 7), 0))
    _save(tmp_path / "c1" / "c1_seg.nii.gz", np.zeros((9, 8, 7), np.uint8))
    model_order = ("t2", "flair", "t1ce", "t1")
    listing = list_cases(str(tmp_path), model_order)
    assert listing.layout == "brats"
    c1, c2 = listing.cases
    assert [m for m, _ in c1.images] == list(model_order)
    assert [Path(p).name for _, p in c1.images] == [f"c1_{m}.nii.gz" for m in model_order]
    assert c1.label is not None and c1.label.endswith("c1_seg.nii.gz") and c1.error is None
    assert c2.error is not None and "missing modality t2" in c2.error


def test_csv_maps_channels_by_position_and_rejects_a_channel_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "x0.nii.gz", _scan((9, 8, 7), 0))
    _save(tmp_path / "x1.nii.gz", _scan((9, 8, 7), 1))
    (tmp_path / "cases.csv").write_text("case_id,image_a,image_b\nk1,x0.nii.gz,x1.nii.gz\n")
    listing = list_cases(str(tmp_path / "cases.csv"), ("p", "q"))
    (case,) = listing.cases
    assert case.case_id == "k1" and case.label is None
    assert case.images == (("p", str(tmp_path / "x0.nii.gz")), ("q", str(tmp_path / "x1.nii.gz")))
    with pytest.raises(InferError, match="2 channel"):
        list_cases(str(tmp_path / "cases.csv"), ("t1",))
    assert map_modalities(["b", "a"], ["a", "b"], "x") == [1, 0]


# ------------------------------------------------------------------------------ stages


def test_stage_chain_writes_the_library_prediction_in_the_scan_geometry(tmp_path: Path, tiny_model) -> None:
    model, ckpt, spec = tiny_model
    shape = (23, 17, 11)  # crops one axis, pads the others
    scan = _scan(shape, 5)
    path = _save(tmp_path / "in" / "s.nii.gz", scan)
    grid, record = preprocess_image([scan], AFFINE, nib.io_orientation(AFFINE), GRID)
    expected = Inferer(mode="dense", chunk_points=1024)(model, grid)
    mask_ref = record.to_original(expected.mask.astype(np.uint8), order=0)
    assert 0 < mask_ref.sum() < mask_ref.size
    _save(tmp_path / "ref.nii.gz", mask_ref)

    ctx = _ctx(spec, tmp_path / "out", save_probabilities=True, save_zarr=True)
    predictor = CasePredictor(ckpt, mode="dense", chunk_points=1024)
    result = process_case(InferCase("s", images=(("t1", path),), label=str(tmp_path / "ref.nii.gz")), ctx, predictor)

    assert result.status == "ok", result.error
    assert result.n_queries == math.prod(GRID) and result.mode == "dense" and result.dice == 1.0 == result.iou
    out = nib.load(result.mask)
    assert out.shape == shape and out.get_data_dtype() == np.uint8 and np.allclose(out.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(out.dataobj), mask_ref)
    assert result.foreground_ml == pytest.approx(mask_ref.sum() * 1.2 * 0.9 * 1.5 / 1000.0)
    prob = nib.load(ctx.outputs.probability("s"))
    assert prob.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(prob.dataobj), record.to_original(expected.probability, order=1), atol=1e-6)
    assert ctx.outputs.done_outputs(True, True) == {"s"}
    assert not list((tmp_path / "out").rglob(f"*{TMP_SUFFIX}"))


def test_bad_cases_become_failed_rows_with_one_line_errors(tmp_path: Path, tiny_model) -> None:
    _, ckpt, spec = tiny_model
    nan = _scan((9, 8, 7), 0)
    nan[4, 4, 4] = np.nan
    files = {
        "nan": _save(tmp_path / "nan.nii.gz", nan),
        "four_d": _save(tmp_path / "four_d.nii.gz", np.zeros((9, 8, 7, 3), np.float32)),
        "flat": _save(tmp_path / "flat.nii.gz", np.zeros((9, 8), np.float32)),
    }
    (tmp_path / "corrupt.nii.gz").write_bytes(gzip.compress(b"\x00" * 100)[:40])
    files["corrupt"] = str(tmp_path / "corrupt.nii.gz")
    ctx = _ctx(spec, tmp_path / "out")
    rows = {cid: read_case(case_item(InferCase(cid, images=(("t1", p),))), ctx) for cid, p in files.items()}
    assert all(r["status"] == "failed" and "\n" not in r["error"] for r in rows.values())
    assert "non-finite" in rows["nan"]["error"] and files["nan"] in rows["nan"]["error"]
    assert "3D volume" in rows["four_d"]["error"] and "3D volume" in rows["flat"]["error"]
    assert "corrupt.nii.gz" in rows["corrupt"]["error"]

    predictor = CasePredictor(ckpt, mode="dense")

    class OutOfMemory:
        chunk_points = 7

        def __call__(self, model, image):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    predictor.inferer = OutOfMemory()  # type: ignore[assignment]
    ok = _save(tmp_path / "ok.nii.gz", _scan((9, 8, 7), 1))
    result = process_case(InferCase("ok", images=(("t1", ok),)), ctx, predictor)
    assert result.status == "failed" and "out of memory" in result.error and "chunk_points=7" in result.error
    assert not (tmp_path / "out" / "masks" / "ok.nii.gz").exists()


def test_zarr_store_cases_are_listed_by_split_and_written_in_the_source_geometry(tmp_path: Path, tiny_model) -> None:
    from ossnet_pipelines.ingest import IngestJob, ingest

    model, ckpt, spec = tiny_model
    shape = (21, 19, 13)
    for n in range(2):
        scan = _scan(shape, 10 + n)
        _save(tmp_path / "lits" / f"volume-{n}.nii.gz", scan)
        _save(tmp_path / "lits" / f"segmentation-{n}.nii.gz", (scan > 400).astype(np.uint8))
    store = str(tmp_path / "s.zarr")
    report = ingest(IngestJob(source=str(tmp_path / "lits"), store=store, preset="tiny", volume_shape=GRID,
                              val_fraction=0.5, executor="serial"))
    assert report.ok
    listing = list_cases(store, ("t1",), volume_shape=GRID, zscore_mask="all", split="val")
    assert listing.layout == "zarr" and len(listing.cases) == 1 and listing.store_channels == (0,)
    (case,) = listing.cases
    assert case.kind == "zarr" and case.label == "store"
    with pytest.raises(InferError, match="grid"):
        list_cases(store, ("t1",), volume_shape=(16, 16, 16))

    ctx = StageContext(modalities=spec.modalities, volume_shape=GRID, zscore_mask="all",
                       outputs=OutputLayout(str(tmp_path / "out")), store_url=listing.store_url,
                       store_channels=listing.store_channels)
    result = process_case(case, ctx, CasePredictor(ckpt, mode="mise_lowres", chunk_points=1024))
    assert result.status == "ok", result.error
    out = nib.load(result.mask)  # both sources share AFFINE: the store's record maps back onto it
    assert out.shape == shape and np.allclose(out.affine, AFFINE) and 0.0 <= result.dice <= 1.0


def test_fsspec_urls_for_inputs_and_outputs(tiny_model) -> None:
    import fsspec

    _, ckpt, spec = tiny_model
    fs = fsspec.filesystem("memory")
    scan = _scan((13, 11, 9), 3)
    fs.pipe_file("/infer-url/in/u1.nii.gz", gzip.compress(nib.Nifti1Image(scan, AFFINE).to_bytes()))
    listing = list_cases("memory://infer-url/in", ("t1",))
    (case,) = listing.cases
    assert case.case_id == "u1" and case.images[0][1].startswith("memory://")
    layout = OutputLayout("memory://infer-url/out")
    layout.prepare(False, False)
    ctx = StageContext(modalities=spec.modalities, volume_shape=GRID, zscore_mask="nonzero", outputs=layout)
    result = process_case(case, ctx, CasePredictor(ckpt, mode="mise_lowres", chunk_points=1024))
    assert result.status == "ok", result.error
    assert result.mask == "memory://infer-url/out/masks/u1.nii.gz" and layout.existing(layout.masks) == {"u1"}
    out = nib.Nifti1Image.from_bytes(gzip.decompress(fs.cat_file("/infer-url/out/masks/u1.nii.gz")))
    assert out.shape == scan.shape and np.allclose(out.affine, AFFINE)


# ------------------------------------------------------------------------------ atomic writes


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(str(target), b"old")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()  # not mkstemp's private 0600

    def boom() -> bytes:
        raise KeyboardInterrupt  # killed while encoding: the old file stays whole

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(str(target), boom)
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]

    (target.parent / f".f.bin.x1{TMP_SUFFIX}").write_bytes(b"partial")  # left by a killed process
    assert remove_stale_temps([str(target.parent)]) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]

    atomic_write_bytes("memory://infer-unit/x/f.bin", lambda: b"new")  # the fsspec (non-local) path
    import fsspec

    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/infer-unit/x/f.bin") == b"new"
    assert fs.ls("/infer-unit/x", detail=False) == ["/infer-unit/x/f.bin"]  # the temporary name is gone


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
def test_streamed_nifti_keeps_geometry_codes_dtype_and_every_slab(tmp_path: Path, name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dask.array as da

    from ossnet_pipelines import nifti

    monkeypatch.setattr(nifti, "SLAB_BYTES", 5 * 6 * 2)  # two planes per slab: several slabs, a ragged last one
    mask = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 3 == 0).astype(np.uint8)
    for data in (mask, da.from_array(mask, chunks=(5, 6, 3))):
        written = nifti.write_volume(str(tmp_path / name), data, AFFINE, sform_code=1, qform_code=2,
                                     compress=name.endswith(".gz"))
        assert written == np.count_nonzero(mask)  # the foreground, counted while streaming
        img = nib.load(str(tmp_path / name))
        assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, AFFINE)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 2
        np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    probability = np.linspace(0, 1, 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    nifti.write_volume(str(tmp_path / name), probability, AFFINE, compress=name.endswith(".gz"))
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / name)).dataobj), probability)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


# ------------------------------------------------------------------------------ report, resume


def _row(cid: str, status: str = "ok", sha: str = "s1", dice: float = math.nan) -> CaseResult:
    return CaseResult(cid, status, seconds=1.5, n_queries=10, foreground_ml=2.0, dice=dice, iou=dice,
                      model="models:/m/1", model_sha256=sha, mask=f"/o/masks/{cid}.nii.gz")


def test_report_round_trip_and_summary(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    rows = [_row("b", dice=0.5), _row("a", dice=1.0), CaseResult("c", "failed", error="c.nii.gz: broken"),
            _row("d", "skipped")]
    path = write_report(layout, rows)
    back = read_report(layout)
    assert sorted(back) == ["a", "b", "c", "d"] and back["c"].error == "c.nii.gz: broken"
    assert back["a"] == rows[1] and math.isnan(back["d"].dice)
    csv = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(csv["case_id"]) == ["a", "b", "c", "d"] and list(csv.columns) == list(REPORT_COLUMNS)
    assert {"case_id", "status", "error", "seconds", "n_queries", "foreground_ml", "dice", "iou"} <= set(csv.columns)
    assert path.endswith("report.parquet")

    report = InferReport(str(tmp_path / "out"), tuple(sorted(back.values(), key=lambda r: r.case_id)), seconds=9.0,
                         pipeline_seconds=6.0, report_path=path, actors=2)
    assert (report.count("ok"), report.count("failed"), report.count("skipped"), report.processed) == (2, 1, 1, 3)
    assert report.mean_dice == pytest.approx(0.75) and report.cases_per_s == pytest.approx(0.5)
    text = report.table()
    assert "c.nii.gz: broken" in text and "2 ok, 1 failed, 1 skipped" in text and "0.7500" in text

    (tmp_path / "out" / "report.parquet").write_bytes(b"torn")
    assert read_report(layout) == {}  # unreadable: redo everything rather than trust it


def test_plan_skips_only_finished_cases_of_the_same_model_with_outputs_present() -> None:
    previous = {"ok": _row("ok"), "skip": _row("skip", "skipped"), "fail": _row("fail", "failed"),
                "other": _row("other", sha="s2"), "gone": _row("gone")}
    ids = ["ok", "skip", "fail", "other", "gone", "new", "orphan"]
    plan = plan_cases(ids, previous, {"ok", "skip", "fail", "other", "orphan"}, "s1")
    assert [r.case_id for r in plan.skipped] == ["ok", "skip"] and all(r.status == "skipped" for r in plan.skipped)
    assert plan.skipped[0].seconds == 1.5  # earlier figures are kept
    assert plan.todo == ("fail", "other", "gone", "new", "orphan")
    assert plan.redo_reasons == {"fail": "previous status failed", "other": "another model",
                                 "gone": "output missing", "orphan": "no report row (interrupted run)"}
    assert plan_cases(ids, previous, set(ids), "s1", overwrite=True).todo == tuple(ids)


# ------------------------------------------------------------------------------ job, CLI


def test_job_validation_and_cli_precedence(tmp_path: Path) -> None:
    with pytest.raises(InferError, match="infer.chunk_points"):
        InferJob(input="in", output="out", chunk_points=0)
    with pytest.raises(InferError, match="infer.mode"):
        InferJob(input="in", output="out", mode="fast")
    with pytest.raises(InferError, match="infer.split"):
        InferJob(input="in", output="out", layout="nifti", split="val")
    with pytest.raises(InferError, match="infer.save_probabilities: needs mode 'dense' or 'auto', not 'mise'"):
        InferJob(input="in", output="out", mode="mise", save_probabilities=True)
    assert InferJob(input="in", output="out", save_probabilities=True).predictor_mode == "dense"
    assert InferJob(input="in", output="out").predictor_mode == "auto"
    job = InferJob(input="rel/in", output="rel/out").normalized()
    assert Path(job.input).is_absolute() and Path(job.output).is_absolute()
    assert InferJob(input="s3://b/in", output="s3://b/out/").normalized().output == "s3://b/out"

    parser = configure_infer_parser(argparse.ArgumentParser())
    config = tmp_path / "infer.yaml"
    config.write_text("input: /data/in\noutput: /data/out\nmode: dense\nactors: 3\nchunk_points: 1024\n")
    args = parser.parse_args(["--config", str(config), "--set", "actors=4", "--actors", "5", "--save-zarr",
                              "--model", "models:/x@y"])
    job = job_from_args(args)
    assert (job.input, job.mode, job.actors, job.chunk_points, job.save_zarr, job.model) == (
        "/data/in", "dense", 5, 1024, True, "models:/x@y")
    assert job_from_args(parser.parse_args(["/other", "--config", str(config)])).input == "/other"
    assert job_from_args(parser.parse_args(["--config", str(config), "--recall-margin", "12"])).recall_margin == 12.0
    with pytest.raises(InferError, match=r"^infer.recall_margin: must be >= 0.0, got -1.0$"):
        InferJob(input="in", output="out", recall_margin=-1.0)
    with pytest.raises(InferError, match=r"^infer.output: required field is missing$"):
        job_from_args(parser.parse_args(["/in"]))
    with pytest.raises(InferError, match=r"^infer.actors: must be >= 1, got 0$"):
        job_from_args(parser.parse_args(["/in", "--config", str(config), "--set", "actors=0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["/in", "--outptu", "x"])  # strict: an unknown flag is an error


def test_address_submits_the_same_command_as_a_cluster_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import ossnet_pipelines.jobs
    from ossnet_pipelines.infer.cli import run_infer_cli

    calls = []
    monkeypatch.setattr(ossnet_pipelines.jobs, "submit_cli_command",
                        lambda address, argv, **kw: calls.append((address, argv)) or 0)
    argv = ["infer", "s3://b/in", "--output", "s3://b/out", "--address", "http://127.0.0.1:8275", "--actors", "4"]
    monkeypatch.setattr("sys.argv", ["ossnet", "-v", *argv])
    args = configure_infer_parser(argparse.ArgumentParser()).parse_args(argv[1:])
    assert run_infer_cli(args) == 0
    ((address, submitted),) = calls
    assert address == "http://127.0.0.1:8275" and submitted[:2] == ["infer", "--config-json"]
    back = job_from_args(configure_infer_parser(argparse.ArgumentParser()).parse_args(submitted[1:]))
    assert (back.input, back.output, back.actors) == ("s3://b/in", "s3://b/out", 4)  # URLs stay as given


def test_a_bad_reference_label_leaves_the_prediction_and_says_why(tmp_path: Path, tiny_model) -> None:
    """The mask is written either way; the Dice is missing, with a one-line note naming the file."""
    _, ckpt, spec = tiny_model
    shape = (23, 17, 11)
    image = _save(tmp_path / "in" / "s.nii.gz", _scan(shape, 5))
    nan_label = np.zeros(shape, np.float32)
    nan_label[3, 3, 3] = np.nan
    cases = {
        "nan": (_save(tmp_path / "nan.nii.gz", nan_label), "nan.nii.gz: non-finite voxels (NaN or Inf)"),
        "shape": (_save(tmp_path / "shape.nii.gz", np.zeros((23, 17, 12), np.uint8)),
                  "shape.nii.gz: label shape (23, 17, 12) != the image shape (23, 17, 11)"),
        "affine": (_save(tmp_path / "affine.nii.gz", np.zeros(shape, np.uint8), AFFINE + np.eye(4) * 0.5),
                   "affine.nii.gz: affine differs from the image"),
    }
    predictor = CasePredictor(ckpt, mode="dense", chunk_points=1024)
    for name, (label, message) in cases.items():
        ctx = _ctx(spec, tmp_path / f"out-{name}")
        result = process_case(InferCase("s", images=(("t1", image),), label=label), ctx, predictor)
        assert result.status == "ok" and Path(result.mask).is_file(), name
        assert math.isnan(result.dice) and message in result.error, (name, result.error)
        assert "\n" not in result.error


def test_a_multi_target_model_writes_the_label_map_in_the_source_values_and_scores_each_target(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from ossnet.targets import TARGET_PRESETS

    targets = TARGET_PRESETS["brats-regions"]
    torch.manual_seed(3)
    cfg = model_config("C", "tiny", in_channels=1, volume_shape=GRID, targets=targets)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a decoder bias per target: nested, non-empty regions from an untrained model
        model.decoder.fc_out.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    spec = PreprocessSpec(modalities=("t1",), volume_shape=GRID)
    shape = (23, 17, 11)
    scan = _scan(shape, 5)
    path = _save(tmp_path / "in" / "s.nii.gz", scan)
    grid, record = preprocess_image([scan], AFFINE, nib.io_orientation(AFFINE), GRID)
    expected = Inferer(mode="dense", chunk_points=1024)(model, grid)
    regions = np.stack([record.to_original(p, order=1) >= 0.5 for p in expected.probability])
    label_ref = targets.label_map(regions)
    assert len(np.unique(label_ref)) >= 3, np.unique(label_ref)
    _save(tmp_path / "ref.nii.gz", label_ref)

    ctx = _ctx(spec, tmp_path / "out", targets=targets, save_target_masks=True)
    ctx.outputs.prepare(False, False, targets.names)
    predictor = CasePredictor(checkpoint_bytes(model, spec), mode="dense", chunk_points=1024)
    result = process_case(InferCase("s", images=(("t1", path),), label=str(tmp_path / "ref.nii.gz")), ctx, predictor)
    assert result.status == "ok", result.error
    written = np.asarray(nib.load(result.mask).dataobj)
    np.testing.assert_array_equal(written, label_ref)  # the source's values (0, 1, 2, 4), in the scan's geometry
    for t, name in enumerate(targets.names):
        np.testing.assert_array_equal(np.asarray(nib.load(ctx.outputs.target_mask(name, "s")).dataobj), regions[t])
    scores = json.loads(result.targets)
    assert all(scores[f"dice_{n}"] == 1.0 and scores[f"hd95_{n}"] == 0.0 for n in targets.names)
    assert ctx.outputs.done_outputs(False, False, targets.names) == {"s"}
    # A reference holding a value the map does not read: the prediction stands, the metric says why.
    _save(tmp_path / "bad.nii.gz", np.where(label_ref == 2, 3, label_ref).astype(np.uint8))
    bad = process_case(InferCase("b", images=(("t1", path),), label=str(tmp_path / "bad.nii.gz")), ctx, predictor)
    assert bad.status == "ok" and "values [3]" in bad.error and math.isnan(bad.dice)
    # The report expands the per-target scores into columns and states its conventions.
    report_path = write_report(ctx.outputs, [result, bad])
    frame = pd.read_parquet(report_path)
    assert {"dice_wt", "iou_tc", "hd95_et", "tp_et"} <= set(frame.columns) and frame["dice_wt"].iloc[1] == 1.0
    summary = InferReport(output=str(tmp_path / "out"), cases=(result, bad), seconds=1.0).summary()
    assert "wt: mean Dice 1.0000 over 1 cases, global Dice 1.0000" in summary and "373.13" in summary


def test_cases_lost_with_a_worker_get_one_more_pass_then_fail_in_one_line(
    tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data gives no row for a case whose block died with its worker or node. Such cases
    run once more; a case lost on both passes is a failed row naming the likely cause."""
    import ray

    from ossnet_pipelines.infer import run as infer_run
    from ossnet_pipelines.infer.run import run_inference

    _, ckpt, _ = tiny_model
    (tmp_path / "model.pt").write_bytes(ckpt)
    for i in range(4):
        _save(tmp_path / "in" / f"s{i}.nii.gz", _scan((9, 8, 7), i))
    passes: list[list[str]] = []

    def pipeline(cases, job, ctx, checkpoint, gpus):  # the stages in this process, minus lost cases
        passes.append([c.case_id for c in cases])
        predictor = CasePredictor(checkpoint, mode="dense")
        for case in cases:
            if case.case_id == "s3" or (case.case_id == "s1" and len(passes) == 1):
                continue  # lost with its worker: no row
            yield process_case(case, ctx, predictor).to_row()

    monkeypatch.setattr(infer_run, "ensure_ray", lambda **kw: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(infer_run, "_pipeline", pipeline)
    job = InferJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tmp_path / "model.pt"),
                   mode="dense")
    report = run_inference(job)

    assert passes == [["s0", "s1", "s2", "s3"], ["s1", "s3"]]
    status = {r.case_id: r.status for r in report.cases}
    assert status == {"s0": "ok", "s1": "ok", "s2": "ok", "s3": "failed"}
    (lost,) = [r for r in report.cases if r.case_id == "s3"]
    assert "\n" not in lost.error and "worker died" in lost.error
    saved = read_report(OutputLayout(str(tmp_path / "out")))
    assert {cid: r.status for cid, r in saved.items()} == status
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
