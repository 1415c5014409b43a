"""Parallel ingest as Ray tasks on the shared session cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ossnet.preprocess import invert_zscore
from ossnet_pipelines.ingest import IngestJob, ingest
from ossnet_pipelines.store import open_store

SHAPE = (23, 19, 17)
AFFINE = np.array([[-1.0, 0.0, 0.0, 30.0], [0.0, 0.0, 1.5, -20.0], [0.0, 0.8, 0.0, 10.0], [0.0, 0.0, 0.0, 1.0]])


def _write_case(root: Path, case_id: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    (root / case_id).mkdir(parents=True)
    vol = rng.integers(-1000, 1000, size=SHAPE).astype(np.int16)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[5:15, 4:12, 3:11] = rng.choice([1, 2], size=(10, 8, 8))
    n = case_id.split("-")[1]
    nib.save(nib.Nifti1Image(vol, AFFINE), str(root / case_id / f"volume-{n}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, AFFINE), str(root / case_id / f"segmentation-{n}.nii.gz"))
    return vol, seg


def test_ray_tasks_ingest_cases_in_parallel(ray_session: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = {f"lits-{n:03d}": _write_case(tmp_path / "lits", f"case-{n}", rng) for n in range(3)}
    url = f"file://{tmp_path / 's.zarr'}"
    job = IngestJob(source=str(tmp_path / "lits"), store=url, preset="tiny", workers=2)
    report = ingest(job)  # auto: Ray is up, so the cases run as Ray tasks
    assert report.executor == "ray" and report.ok and report.count("ingested") == 3

    store = open_store(url)
    assert store.case_ids() == sorted(cases)
    for cid, (vol, seg) in cases.items():
        rec = store.record(cid)
        arrays = store.read_case(cid, ("image", "label"))
        restored = rec.to_original(invert_zscore(arrays["image"], rec.means, rec.stds, rec.zscore_mask), order=1)[0]
        np.testing.assert_allclose(restored, vol, rtol=2e-3, atol=1.0)  # 23x19x17 is padded: all kept
        np.testing.assert_array_equal(rec.to_original(arrays["label"], order=0), seg > 0)

    again = ingest(job)  # a re-run skips what is complete
    assert again.count("skipped") == 3


def test_one_scan_can_run_its_chunks_on_the_ray_cluster(ray_session: Any, tmp_path: Path) -> None:
    # scheduler "ray": the dask graph of one scan runs as Ray tasks; the store is the same.
    rng = np.random.default_rng(1)
    _write_case(tmp_path / "lits", "case-7", rng)
    stores = {}
    for scheduler in ("threads", "ray"):
        url = str(tmp_path / f"{scheduler}.zarr")
        report = ingest(IngestJob(source=str(tmp_path / "lits"), store=url, preset="tiny", executor="serial",
                                  scheduler=scheduler, threads=2, resample="resize"))
        assert report.ok, report.table()
        stores[scheduler] = open_store(url).read_case("lits-007", ("image", "label", "border"))
    for name, array in stores["threads"].items():
        np.testing.assert_array_equal(stores["ray"][name], array, err_msg=name)
