"""Batch inference as a Ray Data job with a model from a local MLflow registry (SQLite)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ossnet.checkpoint import PreprocessSpec, save_checkpoint
from ossnet.config import model_config
from ossnet.inference import Inferer
from ossnet.model import build_model
from ossnet.preprocess import preprocess_image
from ossnet_pipelines.infer import InferJob, run_inference
from ossnet_pipelines.infer.outputs import TMP_SUFFIX
from ossnet_pipelines.synthetic import ellipsoid_scan
from ossnet_pipelines.tracking import ModelNotFoundError, RunLogger, register_and_promote, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]
GRID = (24, 24, 16)  # the model grid; scans are larger (cropped) or smaller (padded)
CHUNK = 4096
MODEL_NAME = "tiny-infer"
# An LPS scan (x and y flipped), a scan with permuted and flipped axes, and a plain RAS scan.
LPS = np.array([[-1.2, 0.0, 0.0, 40.0], [0.0, -1.0, 0.0, 30.0], [0.0, 0.0, 1.5, -10.0], [0.0, 0.0, 0.0, 1.0]])
PERMUTED = np.array([[0.0, 0.0, -1.1, 80.0], [-0.9, 0.0, 0.0, 60.0], [0.0, 1.3, 0.0, -40.0], [0.0, 0.0, 0.0, 1.0]])
GOOD = {"lps": ((37, 41, 29), LPS), "perm": ((19, 23, 13), PERMUTED), "plain": ((26, 22, 18), np.eye(4))}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _library_mask(model: torch.nn.Module, path: Path, mode: str = "dense") -> np.ndarray:
    """What the library predicts for a scan, mapped back onto the scan's own grid."""
    img = nib.load(str(path))
    grid, record = preprocess_image([np.asarray(img.dataobj, dtype=np.float32)], img.affine,
                                    nib.io_orientation(img.affine), GRID)
    result = Inferer(mode=mode, chunk_points=CHUNK)(model, grid)
    return record.to_original(result.mask.astype(np.uint8), order=0)


def _contrasted_model() -> torch.nn.Module:
    """A random tiny variant C whose output is rescaled so that about half of a scan is foreground.

    A random decoder's probabilities sit in a narrow band (about 0.51-0.56 here), so the mask
    would be all or nothing; centring and stretching the output logit around the median of a
    sample scan gives masks with real boundaries (and few voxels near the threshold).
    """
    torch.manual_seed(0)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=GRID)).eval()
    grid, _ = preprocess_image([ellipsoid_scan(GOOD["lps"][0], 0)], LPS, nib.io_orientation(LPS), GRID)
    median = float(np.median(Inferer(mode="dense", chunk_points=CHUNK)(model, grid).probability))
    with torch.no_grad():
        out = model.decoder.fc_out
        out.bias.sub_(math.log(median / (1.0 - median))).mul_(20.0)
        out.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A tiny single-channel variant C logged as a bundle, registered and promoted to ``champion``."""
    root = tmp_path_factory.mktemp("infer-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSNET_HOME", str(root / "home"))  # the model download cache
        uri = resolve_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        model = _contrasted_model()
        ckpt = save_checkpoint(root / "model.pt", model, PreprocessSpec(modalities=("t1",), volume_shape=GRID))
        with RunLogger("infer-test-model", experiment="ossnet-infer-test", tracking_uri=uri) as run:
            info = run.log_model_bundle(ckpt, name="model")
        promotion = register_and_promote(info.model_uri, MODEL_NAME, 0.5, "test_dice", tracking_uri=uri)
        version = promotion.version
        assert promotion.promoted
        yield SimpleNamespace(uri=uri, model=model, spec=f"models:/{MODEL_NAME}@champion", version=version,
                              home=root / "home")


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory, registry: SimpleNamespace) -> SimpleNamespace:
    """Three good scans (two with reference labels) and three bad ones, plus the expected masks."""
    root = tmp_path_factory.mktemp("infer-scans")
    files, expected = {}, {}
    for i, (cid, (shape, affine)) in enumerate(GOOD.items()):
        files[cid] = _save(root / "scans" / f"{cid}.nii.gz", ellipsoid_scan(shape, i), affine)
        expected[cid] = _library_mask(registry.model, files[cid])
        assert 0 < expected[cid].sum() < expected[cid].size  # a non-trivial mask
    for cid in ("lps", "perm"):  # the reference is the expected mask itself: Dice 1 exactly
        _save(root / "labels" / f"{cid}.nii.gz", expected[cid], GOOD[cid][1])
    (root / "scans" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    nan = ellipsoid_scan((20, 20, 12), 7)
    nan[5, 5, 5] = np.nan
    _save(root / "scans" / "nan.nii.gz", nan, np.eye(4))
    _save(root / "scans" / "vol4d.nii.gz", np.ones((9, 8, 7, 2), np.float32), np.eye(4))  # 2 channels in one file
    _save(root / "scans" / "slice2d.nii.gz", np.ones((20, 20), np.float32), np.eye(4))
    return SimpleNamespace(root=root / "scans", labels=root / "labels", files=files, expected=expected)


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_masks_equal_the_library_dense_prediction_in_scan_geometry_and_a_rerun_skips(
    ray_session: Any, registry: SimpleNamespace, scans: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = InferJob(input=str(scans.root), output=str(out), model=registry.spec, tracking_uri=registry.uri,
                   labels=str(scans.labels), mode="dense", chunk_points=CHUNK, actors=2, save_probabilities=True,
                   save_zarr=True)
    seen: list[Any] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSNET_HOME", str(registry.home))
        report = run_inference(job, progress=seen.append)

    statuses = {c.case_id: c.status for c in report.cases}
    assert statuses == {"lps": "ok", "perm": "ok", "plain": "ok", "corrupt": "failed", "nan": "failed",
                        "vol4d": "failed", "slice2d": "failed"}
    assert sorted(r.case_id for r in seen) == sorted(statuses)  # progress saw every processed case
    rows = {c.case_id: c for c in report.cases}
    assert "corrupt.nii.gz" in rows["corrupt"].error and "non-finite" in rows["nan"].error
    assert "3D volume" in rows["vol4d"].error and "3D volume" in rows["slice2d"].error
    assert all("\n" not in rows[c].error for c in ("corrupt", "nan", "vol4d", "slice2d"))
    for cid, expected in scans.expected.items():
        src, mask = nib.load(str(scans.files[cid])), nib.load(str(out / "masks" / f"{cid}.nii.gz"))
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
        row = rows[cid]
        voxel_ml = abs(np.linalg.det(src.affine[:3, :3])) / 1000.0
        assert row.foreground_ml == pytest.approx(expected.sum() * voxel_ml)
        assert row.n_queries == math.prod(GRID) and row.mode == "dense"
        assert row.model == f"models:/{MODEL_NAME}/{registry.version}" and row.mask.endswith(f"masks/{cid}.nii.gz")
        prob = nib.load(str(out / "probabilities" / f"{cid}.nii.gz"))
        assert prob.shape == src.shape and prob.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(prob.dataobj) >= 0.5, expected > 0)
    assert rows["lps"].dice == 1.0 == rows["perm"].iou and math.isnan(rows["plain"].dice)
    assert report.mean_dice == 1.0 and report.count("ok") == 3 and not report.ok

    table = pd.read_parquet(out / "report.parquet")
    csv = pd.read_csv(out / "report.csv", dtype={"case_id": str}, keep_default_na=False)  # a case may be "nan"
    assert list(table["case_id"]) == sorted(statuses) == list(csv["case_id"])
    assert dict(zip(table["case_id"], table["status"])) == statuses
    np.testing.assert_allclose(table["foreground_ml"].fillna(-1), [rows[c].foreground_ml if rows[c].status == "ok"
                                                                    else -1 for c in table["case_id"]])
    import zarr

    copy = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    np.testing.assert_array_equal(copy["lps"]["mask"][...], scans.expected["lps"])
    assert copy["lps"].attrs["complete"] is True
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]

    before = _files(out / "masks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSNET_HOME", str(registry.home))
        again = run_inference(job)
    assert {c.case_id: c.status for c in again.cases} == {**statuses, "lps": "skipped", "perm": "skipped",
                                                           "plain": "skipped"}
    assert _files(out / "masks") == before  # done cases were not rewritten; failed ones were retried
    assert {c.case_id: c.foreground_ml for c in again.cases if c.status == "skipped"} == {
        c: rows[c].foreground_ml for c in GOOD}


def test_an_unknown_model_or_alias_fails_before_any_work(registry: SimpleNamespace, scans: SimpleNamespace,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ossnet_cli import main

    out = tmp_path / "never"
    job = InferJob(input=str(scans.root), output=str(out), model=f"models:/{MODEL_NAME}@nope",
                   tracking_uri=registry.uri)
    with pytest.raises(ModelNotFoundError, match="no alias 'nope'.*champion"):
        run_inference(job)
    code = main(["infer", str(scans.root), "--output", str(out), "--model", "models:/missing@champion",
                 "--tracking-uri", registry.uri])
    assert code == 2 and "no registered model 'missing'" in capsys.readouterr().err
    assert not out.exists()


def test_a_killed_cli_run_is_completed_by_a_rerun_without_partial_files(
    ray_session: Any, registry: SimpleNamespace, tmp_path: Path
) -> None:
    n = 8
    for i in range(n):
        _save(tmp_path / "scans" / f"s{i}.nii.gz", ellipsoid_scan((29, 31, 21), 20 + i), PERMUTED)
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    # The CLI process joins the session's cluster (its token auth settings are inherited).
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "OSSNET_HOME": str(registry.home), "PYTHONPATH": pythonpath}
    args = ["infer", str(tmp_path / "scans"), "--output", str(out), "--model", registry.spec, "--tracking-uri",
            registry.uri, "--mode", "dense", "--chunk-points", "1024", "--actors", "1", "--report-every", "0.001"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ossnet_cli", *args], env=env, stdout=log, stderr=log,
                            cwd=tmp_path)
    deadline = time.monotonic() + 300
    try:
        while not list((out / "masks").glob("*.nii.gz")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no mask within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    finished = sorted(p.name for p in (out / "masks").glob("*.nii.gz"))
    assert 1 <= len(finished) < n, "the run was not killed mid-way"
    for name in finished:  # whatever has its final name is complete
        assert nib.load(str(out / "masks" / name)).get_fdata().shape == (29, 31, 21)

    job = InferJob(input=str(tmp_path / "scans"), output=str(out), model=registry.spec, tracking_uri=registry.uri,
                   mode="dense", chunk_points=1024, actors=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSNET_HOME", str(registry.home))
        report = run_inference(job)
    assert report.ok and report.count("ok") + report.count("skipped") == n and report.count("ok") >= n - len(finished)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"s{i}.nii.gz" for i in range(n))
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    expected = _library_mask(registry.model, tmp_path / "scans" / "s0.nii.gz")
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "masks" / "s0.nii.gz")).dataobj), expected)
