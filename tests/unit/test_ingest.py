"""ossnet_pipelines.ingest: NIfTI archives -> store -> read, for every layout, bad inputs and re-runs."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet.preprocess import invert_zscore
from ossnet.config import preset_resample
from ossnet.metrics import dice
from ossnet.sampling import border_band
from ossnet_pipelines.ingest import (
    IngestError,
    IngestJob,
    configure_ingest_parser,
    ingest,
    run_ingest_cli,
    seeded_split,
)
from ossnet_pipelines.ingest.sources import detect_layout, parse_split_file, source_fs
from ossnet_pipelines.store import CaseNotFoundError, open_store

SHAPE = (37, 41, 29)  # odd: crops x and y, pads z on the grid below
GRID = (33, 35, 31)
# Non-identity: axes permuted and flipped, anisotropic spacing, shifted origin.
AFFINE = np.array([[0.0, 0.0, -1.2, 80.0], [-0.9, 0.0, 0.0, 60.0], [0.0, 1.1, 0.0, -40.0], [0.0, 0.0, 0.0, 1.0]])
MODS = ("flair", "t1", "t1ce", "t2")


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _image(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    x = rng.integers(1, 1000, size=shape).astype(np.int16)
    x[:3] = 0  # background for the nonzero z-score mask
    return x


def _label(rng: np.random.Generator, values=(1, 2, 4), shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[8:25, 10:30, 6:20] = rng.choice(values, size=(17, 20, 14))
    return lab


def _brats_case(root: Path, case_id: str, rng: np.random.Generator, skip=(), **override) -> dict[str, np.ndarray]:
    data = {m: _image(rng) for m in MODS}
    data["seg"] = _label(rng)
    data.update(override)
    for key, arr in data.items():
        if key not in skip:
            _save(root / case_id / f"{case_id}_{key}.nii.gz", arr)
    return data


def _job(source, store, **kw) -> IngestJob:
    return IngestJob(source=str(source), store=str(store), preset="tiny", volume_shape=GRID, **kw)


def _check_round_trip(store_url: str, case_id: str, sources: list[np.ndarray], label: np.ndarray) -> None:
    """Stored voxels, un-normalised and mapped back to the source grid, equal the source files."""
    store = open_store(store_url)
    arrays = store.read_case(case_id, ("image", "label", "border"))
    attrs = store.case_attrs(case_id)
    rec = store.record(case_id)
    assert arrays["image"].shape == (len(sources), *GRID) and arrays["image"].dtype == np.float16
    restored = rec.to_original(invert_zscore(arrays["image"], rec.means, rec.stds, rec.zscore_mask), order=1)
    kept = rec.to_original(np.ones(GRID, dtype=bool), order=0)
    assert 0.5 < kept.mean() < 1.0  # some voxels were cropped, most kept
    src = np.stack(sources).astype(np.float32)
    np.testing.assert_allclose(restored[:, kept], src[:, kept], rtol=2e-3, atol=1.0)
    np.testing.assert_array_equal(rec.to_original(arrays["label"], order=0)[kept], (label > 0)[kept])
    # Geometry: affine and spacing are those of the RAS-canonical source, shifted onto the grid.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(sources[0], AFFINE))
    np.testing.assert_allclose(rec.ras_affine, canonical.affine, atol=1e-5)
    np.testing.assert_allclose(attrs["spacing"], canonical.header.get_zooms()[:3], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(attrs["affine"]), rec.grid_affine, atol=1e-9)
    np.testing.assert_allclose(np.asarray(rec.original_affine), AFFINE, atol=1e-6)
    # The border band is the stored label's; low-res arrays are derived on the fly, not stored.
    np.testing.assert_array_equal(arrays["border"].astype(bool), border_band(arrays["label"], store.band_width))
    assert set(store.info["arrays"]) == {"image", "label", "border"}
    assert rec.resample == "none" and store.info["resample"] == "none"
    assert attrs["label_voxels"] == int(arrays["label"].sum())
    for src_info in attrs["sources"].values():
        assert len(src_info["sha256"]) == 64 and src_info["size"] > 0


# ----------------------------------------------------------------------------- layouts


def test_brats_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = {f"BraTS20_Training_{i:03d}": _brats_case(tmp_path / "brats", f"BraTS20_Training_{i:03d}", rng) for i in range(2)}
    report = ingest(_job(tmp_path / "brats", tmp_path / "s.zarr"))
    assert report.ok and report.layout == "brats" and report.count("ingested") == 2
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.modalities == MODS and store.info["zscore_mask"] == "nonzero"
    for cid, data in cases.items():
        _check_round_trip(str(tmp_path / "s.zarr"), cid, [data[m] for m in MODS], data["seg"])
        assert store.case_attrs(cid)["sources"]["flair"]["path"].endswith(f"{cid}_flair.nii.gz")


def test_lits_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vols = {}
    for n, batch in ((3, "Training Batch 1"), (12, "Training Batch 2")):
        vol = rng.integers(-1024, 1500, size=SHAPE).astype(np.int16)
        seg = _label(rng, values=(1, 2))
        _save(tmp_path / "lits" / batch / f"volume-{n}.nii", vol)
        _save(tmp_path / "lits" / batch / f"segmentation-{n}.nii", seg)
        vols[f"lits-{n:03d}"] = (vol, seg)
    report = ingest(_job(tmp_path / "lits", tmp_path / "s.zarr"))
    assert report.ok and report.layout == "lits" and sorted(c.case_id for c in report.cases) == ["lits-003", "lits-012"]
    assert open_store(str(tmp_path / "s.zarr")).info["zscore_mask"] == "all"
    for cid, (vol, seg) in vols.items():
        _check_round_trip(str(tmp_path / "s.zarr"), cid, [vol], seg)


def test_generic_folders_multichannel_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = {}
    for cid in ("p01", "p02"):
        chans = [_image(rng), _image(rng)]
        for c, ch in enumerate(chans):
            _save(tmp_path / "src" / "images" / f"{cid}_{c:04d}.nii.gz", ch)
        seg = _label(rng, values=(1,))
        _save(tmp_path / "src" / "labels" / f"{cid}.nii.gz", seg)
        data[cid] = (chans, seg)
    report = ingest(_job(tmp_path / "src", tmp_path / "s.zarr"))
    assert report.ok and report.layout == "generic"
    assert open_store(str(tmp_path / "s.zarr")).modalities == ("ch0", "ch1")
    for cid, (chans, seg) in data.items():
        _check_round_trip(str(tmp_path / "s.zarr"), cid, chans, seg)


def test_generic_csv_round_trip_with_relative_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows, data = [], {}
    for cid in ("a1", "b2"):
        t1, t2, seg = _image(rng), _image(rng), _label(rng, values=(1,))
        _save(tmp_path / "data" / f"{cid}_t1.nii.gz", t1)
        _save(tmp_path / "data" / f"{cid}_t2.nii.gz", t2)
        _save(tmp_path / "data" / f"{cid}_mask.nii.gz", seg)
        rows.append(f"{cid},data/{cid}_t1.nii.gz,data/{cid}_t2.nii.gz,data/{cid}_mask.nii.gz,42")
        data[cid] = ([t1, t2], seg)
    (tmp_path / "cases.csv").write_text("case_id,image_t1,image_t2,label,age\n" + "\n".join(rows) + "\n")
    report = ingest(_job(tmp_path / "cases.csv", tmp_path / "s.zarr"))
    assert report.ok and open_store(str(tmp_path / "s.zarr")).modalities == ("t1", "t2")
    for cid, (chans, seg) in data.items():
        _check_round_trip(str(tmp_path / "s.zarr"), cid, chans, seg)


def test_memory_store_and_file_url(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = _brats_case(tmp_path / "brats", "c1", rng)
    for url in (f"memory://ossnet-test-{uuid.uuid4().hex}/s.zarr", f"file://{tmp_path / 'f.zarr'}"):
        report = ingest(_job(f"file://{tmp_path / 'brats'}", url))
        assert report.ok and report.executor == "serial"
        _check_round_trip(url, "c1", [data[m] for m in MODS], data["seg"])


def test_detect_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    _brats_case(tmp_path / "b", "c1", rng)
    _save(tmp_path / "l" / "volume-0.nii", _image(rng))
    _save(tmp_path / "g" / "images" / "x.nii.gz", _image(rng))
    (tmp_path / "c.csv").write_text("image,label\n")
    (tmp_path / "e").mkdir()
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "notes.txt").write_text("hi")
    for name, layout in (("b", "brats"), ("l", "lits"), ("g", "generic"), ("c.csv", "generic")):
        fs, root = source_fs(str(tmp_path / name))
        assert detect_layout(fs, root) == layout
    with pytest.raises(IngestError, match="e: empty folder"):
        ingest(_job(tmp_path / "e", tmp_path / "s.zarr"))
    with pytest.raises(IngestError, match="no NIfTI files"):
        ingest(_job(tmp_path / "n", tmp_path / "s.zarr"))
    with pytest.raises(IngestError, match="no such folder"):
        ingest(_job(tmp_path / "missing", tmp_path / "s.zarr"))


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_fail_alone_with_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(6)
    src = tmp_path / "brats"
    good = {cid: _brats_case(src, cid, rng) for cid in ("good1", "good2")}
    nan_img = _image(rng).astype(np.float32)
    nan_img[20, 20, 20] = np.nan
    inf_img = _image(rng).astype(np.float32)
    inf_img[5, 5, 5] = np.inf
    frac_seg = _label(rng).astype(np.float32)
    frac_seg[10, 12, 8] = 1.5
    bad_seg = _label(rng)
    bad_seg[10, 12, 8] = 3
    _brats_case(src, "missing_t1ce", rng, skip=("t1ce",))
    _brats_case(src, "shape_mismatch", rng, seg=_label(rng, shape=(37, 41, 28)))
    _brats_case(src, "nan_voxels", rng, t2=nan_img)
    _brats_case(src, "inf_voxels", rng, flair=inf_img)
    _brats_case(src, "fractional_label", rng, seg=frac_seg)
    _brats_case(src, "label_value_3", rng, seg=bad_seg)
    _brats_case(src, "four_d", rng, t1=np.stack([_image(rng)] * 2, axis=-1))
    _brats_case(src, "two_d", rng, t1=_image(rng)[:, :, 0])
    (src / "empty_case").mkdir()
    data = _brats_case(src, "affine_mismatch", rng)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    _save(src / "affine_mismatch" / "affine_mismatch_t2.nii.gz", data["t2"], shifted)
    _brats_case(src, "truncated", rng)
    blob = (src / "truncated" / "truncated_flair.nii.gz").read_bytes()
    (src / "truncated" / "truncated_flair.nii.gz").write_bytes(blob[: len(blob) // 2])
    _brats_case(src, "corrupt", rng)
    (src / "corrupt" / "corrupt_t1.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 10))

    store_url = str(tmp_path / "s.zarr")
    args = configure_ingest_parser(argparse.ArgumentParser()).parse_args(
        [str(src), "--store", store_url, "--preset", "tiny", "--volume-shape", *map(str, GRID)])
    out = io.StringIO()
    assert run_ingest_cli(args, out=out) == 1
    table = out.getvalue()

    expected = {
        "missing_t1ce": "missing_t1ce: missing modality t1ce",
        "shape_mismatch": "shape_mismatch_seg.nii.gz: label shape (37, 41, 28) != ",
        "nan_voxels": "nan_voxels_t2.nii.gz: non-finite voxels (NaN: 1, Inf: 0",
        "inf_voxels": "inf_voxels_flair.nii.gz: non-finite voxels (NaN: 0, Inf: 1",
        "fractional_label": "fractional_label_seg.nii.gz: non-integer label values, e.g. 1.5",
        "label_value_3": "label_value_3_seg.nii.gz: unexpected label values [3] (allowed: 0, 1, 2, 4)",
        "four_d": "four_d_t1.nii.gz: expected a 3D volume, got a 4D image",
        "two_d": "two_d_t1.nii.gz: expected a 3D volume, got a 2D image",
        "empty_case": "empty_case: empty folder",
        "affine_mismatch": "affine_mismatch_t2.nii.gz: affine differs from",
        "truncated": "truncated_flair.nii.gz: cannot read voxel data, truncated or corrupt file",
        "corrupt": "corrupt_t1.nii.gz: cannot read NIfTI header",
    }
    store = open_store(store_url)
    for cid, message in expected.items():
        line = next(row for row in table.splitlines() if row.startswith(cid + " "))
        assert " failed " in line and message in line, line
        assert store.case_status(cid) == "missing"
        assert store.attrs["last_ingest"]["failed"][cid].count("\n") == 0
    assert store.case_ids() == ["good1", "good2"]
    for cid, data in good.items():
        _check_round_trip(store_url, cid, [data[m] for m in MODS], data["seg"])
    assert f"2 ingested, 0 skipped, {len(expected)} failed" in table


def test_case_ids_never_escape_the_store_and_unmappable_names_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    _save(tmp_path / "img.nii.gz", _image(rng))
    _save(tmp_path / "seg.nii.gz", _label(rng, values=(1,)))
    (tmp_path / "cases.csv").write_text("case_id,image,label\n../x,img.nii.gz,seg.nii.gz\n???,img.nii.gz,seg.nii.gz\n"
                                        "ok,img.nii.gz,seg.nii.gz\n")
    report = ingest(_job(tmp_path / "cases.csv", tmp_path / "out" / "s.zarr"))
    failed = {c.case_id: c.message for c in report.failed}
    assert list(failed) == ["???"] and "cases.csv line 3" in failed["???"] and "cannot be made into a case id" in failed["???"]
    store = open_store(str(tmp_path / "out" / "s.zarr"))
    assert sorted(store.case_ids()) == ["ok", "x"] and store.case_attrs("x")["source_name"] == "../x"
    assert sorted(p.name for p in (tmp_path / "out" / "s.zarr" / "cases").iterdir() if p.is_dir()) == ["ok", "x"]
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "x").exists()


def test_everyday_file_names_hidden_files_and_constant_images(tmp_path: Path) -> None:
    from ossnet_pipelines.ingest.sources import case_id_for

    assert case_id_for("Patient 01") == "Patient_01" and case_id_for("Müller (2)") == "Muller_2"
    assert case_id_for("患者") == "" and case_id_for(".hidden") == "hidden"
    rng = np.random.default_rng(11)
    src = tmp_path / "g"
    for name in ("Patient 01", "Patiënt 02"):
        _save(src / "images" / f"{name}.nii.gz", _image(rng))
        _save(src / "labels" / f"{name}.nii.gz", _label(rng, values=(1,)))
    _save(src / "images" / "flat.nii.gz", np.full(SHAPE, 5.0, dtype=np.float32))
    _save(src / "labels" / "flat.nii.gz", _label(rng, values=(1,)))
    _save(src / "images" / "Patient_01.nii.gz", _image(rng))  # collides with "Patient 01"
    _save(src / "labels" / "Patient_01.nii.gz", _label(rng, values=(1,)))
    _save(src / "images" / ".scratch.nii.gz", _image(rng))
    (src / "labels" / ".DS_Store").write_text("x")
    report = ingest(_job(src, tmp_path / "s.zarr", layout="generic"))
    status = {c.case_id: (c.status, c.message) for c in report.cases}
    assert status["Patient_02"][0] == "ingested" and status["flat"][0] == "ingested"
    assert sum(s == "ingested" for s, _ in status.values()) == 3 and report.count("failed") == 1
    assert "duplicate case id 'Patient_01' (from 'Patient_01' and 'Patient 01')" in report.failed[0].message
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.case_attrs("Patient_02")["source_name"] == "Patiënt 02"
    # A constant image: ingested, said in the summary and kept with the case.
    assert "constant image" in status["flat"][1] and "flat.nii.gz" in status["flat"][1]
    assert "constant image" in store.case_attrs("flat")["warnings"][0]
    table = report.table()
    assert "2 hidden files or folders skipped (names starting with '.' or '__'): .scratch.nii.gz, .DS_Store" in table


def test_source_level_errors_exit_2(tmp_path: Path) -> None:
    parser = configure_ingest_parser(argparse.ArgumentParser())
    err = io.StringIO()
    args = parser.parse_args([str(tmp_path / "nothing"), "--store", str(tmp_path / "s.zarr")])
    assert run_ingest_cli(args, out=io.StringIO(), err=err) == 2
    assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
    with pytest.raises(SystemExit):  # strict: unknown flags are errors
        parser.parse_args(["src", "--store", "s", "--bogus"])
    with pytest.raises(IngestError, match="ingest.val_fraction"):
        _job(tmp_path, tmp_path / "s.zarr", val_fraction=1.5)
    with pytest.raises(IngestError, match="test_fraction: val_fraction \\+ test_fraction must be < 1"):
        _job(tmp_path, tmp_path / "s.zarr", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(IngestError, match=r"^ingest.layout: must be one of 'auto', 'brats', 'lits' or 'generic', got 'x'$"):
        _job(tmp_path, tmp_path / "s.zarr", layout="x")


# ----------------------------------------------------------------------------- re-runs


def test_killed_ingest_is_completed_by_a_rerun(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    cases = {cid: _brats_case(tmp_path / "brats", cid, rng) for cid in ("c1", "c2", "c3")}
    url = str(tmp_path / "s.zarr")
    assert ingest(_job(tmp_path / "brats", url)).ok
    # Simulate a kill while c2 was being rewritten: a started, never committed group, and a
    # manifest written before the kill (c2 hidden while rewritten).
    store = open_store(url, "r+")
    store.write_manifest({k: v for k, v in store.manifest.items() if k != "c2"}, {})
    writer = store.case_writer("c2")
    writer.create_array("image", (4, *GRID), np.float16)
    writer.write("image", np.ones(GRID, dtype=np.float16), (0,))
    reader = open_store(url)
    assert "c2" not in reader.case_ids() and reader.case_status("c2") == "partial"
    with pytest.raises(CaseNotFoundError, match="incomplete"):
        reader.read_case("c2")

    report = ingest(_job(tmp_path / "brats", url))
    assert {c.case_id: c.status for c in report.cases} == {"c1": "skipped", "c2": "ingested", "c3": "skipped"}
    assert open_store(url).case_ids() == ["c1", "c2", "c3"]
    _check_round_trip(url, "c2", [cases["c2"][m] for m in MODS], cases["c2"]["seg"])


def test_changed_source_is_reingested_and_overwrite_redoes_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    _brats_case(tmp_path / "brats", "c1", rng)
    _brats_case(tmp_path / "brats", "c2", rng)
    url = str(tmp_path / "s.zarr")
    ingest(_job(tmp_path / "brats", url))
    new = _image(rng, shape=SHAPE)
    new[3:, :5] = 0  # different content and compressed size
    _save(tmp_path / "brats" / "c1" / "c1_t1.nii.gz", new)
    report = ingest(_job(tmp_path / "brats", url))
    assert {c.case_id: c.status for c in report.cases} == {"c1": "ingested", "c2": "skipped"}
    report = ingest(_job(tmp_path / "brats", url, overwrite=True))
    assert report.count("ingested") == 2


def test_incompatible_rerun_is_refused(tmp_path: Path) -> None:
    _brats_case(tmp_path / "brats", "c1", np.random.default_rng(10))
    url = str(tmp_path / "s.zarr")
    ingest(_job(tmp_path / "brats", url))
    with pytest.raises(IngestError, match="volume_shape"):
        ingest(IngestJob(source=str(tmp_path / "brats"), store=url, preset="tiny"))


# ----------------------------------------------------------------------------- splits


def test_seeded_split_is_deterministic_and_order_free() -> None:
    ids = [f"case{i:03d}" for i in range(40)]
    a = seeded_split(ids, 0.15, seed=0)
    assert a == seeded_split(list(reversed(ids)), 0.15, seed=0)
    assert sum(s == "val" for s in a.values()) == 6
    assert a != seeded_split(ids, 0.15, seed=1)
    grown = seeded_split(ids + ["case999"], 0.15, seed=0)
    assert sum(grown[k] != a[k] for k in ids) <= 1  # adding a case moves at most one other
    assert set(seeded_split(["x", "y"], 0.01, 0).values()) == {"train", "val"}
    assert set(seeded_split(["x", "y"], 0.0, 0).values()) == {"train"}


def test_seeded_test_split_takes_training_cases_and_keeps_the_validation_ones() -> None:
    ids = [f"case{i:03d}" for i in range(40)]
    before = seeded_split(ids, 0.15, seed=0)
    after = seeded_split(ids, 0.15, seed=0, test_fraction=0.15)
    assert sum(s == "test" for s in after.values()) == 6
    assert {k for k, s in after.items() if s == "val"} == {k for k, s in before.items() if s == "val"}
    assert all(before[k] == "train" for k, s in after.items() if s == "test")
    # Small archives keep a training case: 3 cases -> one each; 2 cases -> no test case.
    assert sorted(seeded_split(["x", "y", "z"], 0.1, 0, test_fraction=0.1).values()) == ["test", "train", "val"]
    assert set(seeded_split(["x", "y"], 0.1, 0, test_fraction=0.1).values()) == {"train", "val"}
    assert set(seeded_split(["x", "y"], 0.0, 0, test_fraction=0.1).values()) == {"train", "test"}


def test_ingest_split_is_seeded_and_split_file_honoured(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 5)]
    for cid in ids:
        _brats_case(tmp_path / "brats", cid, rng)
    url = str(tmp_path / "s.zarr")
    ingest(_job(tmp_path / "brats", url, val_fraction=0.25, split_seed=3))  # test_fraction 0.15 by default
    assert open_store(url).manifest == seeded_split(ids, 0.25, 3, test_fraction=0.15)
    assert sorted(open_store(url).manifest.values()) == ["test", "train", "train", "val"]
    # The reference BraTS split format: section headers, one id per line.
    split = tmp_path / "bra_ts_split.txt"
    split.write_text(f"Training:\n    {ids[0]}\n    {ids[1]}\n\nValidation:\n    {ids[2]}\n    BraTS20_Training_999\n")
    report = ingest(_job(tmp_path / "brats", url, split_file=str(split)))
    store = open_store(url)
    assert store.splits() == {"train": ids[:2], "val": [ids[2]], "unassigned": [ids[3]]}
    assert store.attrs["manifest"]["splits"]["method"] == "file"
    assert {c.case_id: c.split for c in report.cases}[ids[2]] == "val"


def test_parse_split_file_formats(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a", "b"], "validation": ["c"]}))
    (tmp_path / "s.csv").write_text("case_id,split\na,train\nb,val\nc,test\n")
    assert parse_split_file(str(tmp_path / "s.json")) == {"a": "train", "b": "train", "c": "val"}
    assert parse_split_file(str(tmp_path / "s.csv")) == {"a": "train", "b": "val", "c": "test"}
    (tmp_path / "bad.csv").write_text("case_id,split\na,holdout\n")
    with pytest.raises(IngestError, match="bad.csv line 2: unknown split name 'holdout'"):
        parse_split_file(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(IngestError, match="before any 'Training:'"):
        parse_split_file(str(tmp_path / "bad.txt"))


# ----------------------------------------------------------------------------- parallel


@pytest.mark.slow  # spawned workers re-import torch: seconds each on a busy machine
def test_process_pool_ingest(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    cases = {cid: _brats_case(tmp_path / "brats", cid, rng) for cid in ("c1", "c2")}
    url = str(tmp_path / "s.zarr")
    report = ingest(_job(tmp_path / "brats", url, workers=2, executor="process"))
    assert report.ok and report.executor == "process" and report.count("ingested") == 2
    for cid, data in cases.items():
        _check_round_trip(url, cid, [data[m] for m in MODS], data["seg"])
    with pytest.raises(IngestError, match="memory:// store lives in one process"):
        ingest(_job(tmp_path / "brats", "memory://x/s.zarr", workers=2, executor="process"))


def test_unlabelled_cases_when_allowed(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    _brats_case(tmp_path / "brats", "c1", rng, skip=("seg",))
    report = ingest(_job(tmp_path / "brats", tmp_path / "a.zarr"))
    assert report.failed[0].message.endswith("missing label (no *_seg.nii[.gz])")
    report = ingest(_job(tmp_path / "brats", tmp_path / "b.zarr", require_labels=False))
    assert report.ok
    store = open_store(str(tmp_path / "b.zarr"))
    assert store.case_attrs("c1")["has_label"] is False
    with pytest.raises(CaseNotFoundError, match="no array 'label'"):
        store.read_case("c1", ("label",))
    assert os.path.isdir(tmp_path / "b.zarr" / "cases" / "c1" / "image")


# ----------------------------------------------------------------------------- resampling


def _world_ball(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    idx = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (((world - centre_mm) / radius_mm) ** 2).sum(axis=1).reshape(shape) <= 1.0


@pytest.mark.parametrize("mode", ["resize", "spacing"])
def test_resampled_ingest_keeps_the_anatomy_and_records_the_mode(tmp_path: Path, mode: str) -> None:
    # Thick 0.7 x 0.7 x 4 mm slices with an LPS-like orientation.
    affine = np.array([[-0.7, 0, 0, 20.0], [0, -0.7, 0, 15.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1.0]])
    shape = (44, 40, 9)
    centre = affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3]
    label = _world_ball(shape, affine, centre, (11.0, 10.0, 12.0)).astype(np.uint8)
    image = (200.0 + 100.0 * label + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)
    _save(tmp_path / "src" / "images" / "c1.nii.gz", image, affine)
    _save(tmp_path / "src" / "labels" / "c1.nii.gz", label, affine)
    store = tmp_path / "s.zarr"
    spacing = {"target_spacing": (1.0, 1.0, 1.0)} if mode == "spacing" else {}
    report = ingest(_job(tmp_path / "src", store, layout="generic", resample=mode, val_fraction=0.0, **spacing))
    assert report.ok, report.table()
    s = open_store(str(store))
    rec = s.record("c1")
    assert rec.resample == mode and s.info["resample"] == mode
    assert s.info["target_spacing"] == ([1.0, 1.0, 1.0] if mode == "spacing" else None)
    if mode == "resize":
        assert rec.resampled == GRID and not rec.cropped
    else:
        assert rec.resampled == (31, 28, 36)  # round(44 * 0.7), round(40 * 0.7), 9 * 4
        np.testing.assert_allclose(s.case_attrs("c1")["spacing"], (44 * 0.7 / 31, 40 * 0.7 / 28, 1.0), rtol=1e-6)
    grid = s.read_case("c1", ("label", "image"))
    back = rec.to_original(grid["label"].astype(np.float32), order=1) >= 0.5
    assert dice(back, label) >= 0.95
    # The stored image is the z-scored source on the grid: brighter where the label is.
    assert grid["image"][0][grid["label"] > 0].mean() > grid["image"][0][grid["label"] == 0].mean() + 1.0


def test_lits_preset_resizes_by_default_and_a_bad_spacing_is_refused(tmp_path: Path) -> None:
    assert preset_resample("lits") == "resize" and preset_resample("brats") == "none"
    with pytest.raises(IngestError, match="ingest.target_spacing: required"):
        _job(tmp_path, tmp_path / "s.zarr", resample="spacing")
    with pytest.raises(IngestError, match=r"^ingest.target_spacing\[1\]: must be > 0.0, got 0.0$"):
        _job(tmp_path, tmp_path / "s.zarr", resample="spacing", target_spacing=(1.0, 0.0, 1.0))
    rng = np.random.default_rng(3)
    _save(tmp_path / "src" / "images" / "fine.nii.gz", _image(rng))
    _save(tmp_path / "src" / "labels" / "fine.nii.gz", (_label(rng) > 0).astype(np.uint8))
    report = ingest(_job(tmp_path / "src", tmp_path / "s.zarr", layout="generic", resample="spacing",
                         target_spacing=(0.01, 0.01, 0.01)))
    (case,) = report.cases
    assert case.status == "failed" and "fine.nii.gz" in case.message and "exceeds the limit" in case.message


@pytest.mark.parametrize("bad, message", [("zero", "zero voxel spacing"), ("nan", "not a finite"),
                                          ("shear", "sheared affine")])
def test_degenerate_header_spacing_fails_the_case_naming_the_file(tmp_path: Path, bad: str, message: str) -> None:
    rng = np.random.default_rng(4)
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header.copy()
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]
    if bad == "zero":
        header["srow_y"] = [0, 0, 0, 0]
    elif bad == "nan":
        header["srow_y"] = [0, np.nan, 0, 0]
    else:
        header["srow_x"] = [1, 0.5, 0, 0]
    for kind, data in (("images", _image(rng)), ("labels", (_label(rng) > 0).astype(np.uint8))):
        path = tmp_path / "src" / kind / "odd.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, None, header), str(path))
    good = np.random.default_rng(5)
    _save(tmp_path / "src" / "images" / "good.nii.gz", _image(good), np.diag([1.0, 1.0, 1.0, 1.0]))
    _save(tmp_path / "src" / "labels" / "good.nii.gz", (_label(good) > 0).astype(np.uint8), np.diag([1.0, 1.0, 1.0, 1.0]))
    report = ingest(_job(tmp_path / "src", tmp_path / "s.zarr", layout="generic", val_fraction=0.0))
    by_id = {c.case_id: c for c in report.cases}
    assert by_id["good"].status == "ingested"
    assert by_id["odd"].status == "failed" and "odd.nii.gz" in by_id["odd"].message and message in by_id["odd"].message
    assert "\n" not in by_id["odd"].message


# ----------------------------------------------------------------------------- target maps


def test_a_regions_store_keeps_the_label_values_and_a_band_per_target(tmp_path: Path) -> None:
    from ossnet.border import target_bands
    from ossnet.targets import TARGET_PRESETS

    rng = np.random.default_rng(7)
    data = _brats_case(tmp_path / "brats", "c1", rng)
    _brats_case(tmp_path / "brats", "c2", rng, seg=np.where(_label(rng) == 4, 3, _label(rng)).astype(np.uint8))
    report = ingest(_job(tmp_path / "brats", tmp_path / "s.zarr", targets="brats-regions"))
    assert report.count("ingested") == 1 and report.count("failed") == 1
    failed = report.failed[0]
    assert failed.case_id == "c2" and "c2_seg.nii.gz" in failed.message and "3" in failed.message
    assert "\n" not in failed.message
    store = open_store(str(tmp_path / "s.zarr"))
    brats = TARGET_PRESETS["brats-regions"]
    assert store.targets == brats and store.info["targets_name"] == "brats-regions"
    arrays = store.read_case("c1", ("label", "border"))
    rec = store.record("c1")
    kept = rec.to_original(np.ones(GRID, dtype=bool), order=0)
    np.testing.assert_array_equal(rec.to_original(arrays["label"], order=0)[kept], data["seg"][kept])
    assert set(np.unique(arrays["label"])) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(arrays["border"], target_bands(arrays["label"], brats, store.band_width))
    attrs = store.case_attrs("c1")
    assert attrs["target_voxels"] == {n: int(m.sum()) for n, m in zip(brats.names, brats.region_masks(arrays["label"]))}
    # The same store cannot take another target map, nor can a binary ingest reuse it.
    with pytest.raises(IngestError, match=r"existing store has targets="):
        ingest(_job(tmp_path / "brats", tmp_path / "s.zarr", targets="brats2023-regions"))
    with pytest.raises(IngestError, match=r"^ingest.targets: must be one of 'binary'"):
        _job(tmp_path / "brats", tmp_path / "t.zarr", targets="brats")


def test_progress_is_a_bar_in_a_terminal_and_log_lines_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging

    from ossnet_pipelines.progress import CaseProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="ossnet_pipelines.progress"):
        bar = CaseProgress("ingest", 3, stream=terminal)
        for failed in (False, True, False):
            bar.update(failed)
    drawn = terminal.getvalue()
    assert "ingest" in drawn and "3/3" in drawn and "failed=1" in drawn
    assert not caplog.records  # the bar replaces the log lines

    log_file = io.StringIO()  # not a terminal: periodic log lines, no bar
    with caplog.at_level(logging.INFO, logger="ossnet_pipelines.progress"):
        lines = CaseProgress("infer", 2, stream=log_file)
        lines.update()
        lines.update(failed=True)
    assert log_file.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["infer: 1/2 cases done (0 failed)",
                                                                     "infer: 2/2 cases done (1 failed)"]
