"""ossnet_pipelines.data, PyTorch path: rows match the store, epochs differ, seeds reproduce (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ossnet_pipelines.synthetic import write_brats_archive
from ossnet.config import AugmentConfig, SamplingConfig, model_config
from ossnet.phantoms import brats_like
from ossnet.sampling import downsample_image, lowres_label
from ossnet_pipelines.data import (
    ROW_KEYS,
    CaseSampleDataset,
    SampleSpec,
    collate_rows,
    load_validation_case,
    sample_case_rows,
)
from ossnet_pipelines.ingest import IngestJob, ingest
from ossnet_pipelines.store import open_store

SOURCE_SHAPE = (37, 41, 29)  # odd: the grid below crops X and Y and pads Z
GRID = (33, 35, 23)
N_POINTS = 97
MODEL = model_config("C", "tiny", volume_shape=GRID)
SAMPLING = SamplingConfig(n_points=N_POINTS, border_ratio=0.5, band_width=2)
PARTIAL = "brats-partial"


def write_brats_store(root: Path, n_cases: int, source_shape=SOURCE_SHAPE, grid=GRID) -> str:
    """Phantoms as a BraTS-layout NIfTI archive, ingested by the real ingest, plus a partial case.

    The partial case (arrays written, never committed) is also listed in the manifest, as a
    stale manifest would list a case that is being rewritten.
    """
    cases = [brats_like(source_shape, seed=100 + i, empty=i == n_cases - 1, case_id=f"brats-{i:03d}")
             for i in range(n_cases)]
    archive = write_brats_archive(cases, root / "archive")
    url = str(root / "store.zarr")
    report = ingest(IngestJob(source=str(archive), store=url, preset="tiny", volume_shape=grid, band_width=2,
                              val_fraction=0.25, test_fraction=0.0, split_seed=0, executor="serial"))
    assert report.ok, report.table()
    store = open_store(url, mode="r+")
    writer = store.case_writer(PARTIAL)
    writer.write_array("image", np.full((4, *grid), np.nan, dtype=np.float16))
    manifest = store.attrs["manifest"]
    store.write_manifest({**store.manifest, PARTIAL: "train"}, manifest["splits"])
    return url


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_brats_store(tmp_path_factory.mktemp("data"), n_cases=4)


def _dataset(url: str, augment: AugmentConfig | None = None, **kw) -> CaseSampleDataset:
    return CaseSampleDataset(url, "train", MODEL, kw.pop("sampling", SAMPLING), augment or AugmentConfig(), **kw)


def _voxels(points: np.ndarray) -> np.ndarray:
    return np.rint((points + 1.0) / 2.0 * (np.asarray(GRID) - 1)).astype(np.int64)


def _assert_rows_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_rows_match_the_store_without_augmentation(store_url: str) -> None:
    ds = _dataset(store_url, AugmentConfig.off())
    store = open_store(store_url)
    assert ds.case_ids == sorted(c for c in store.case_ids("train") if c != PARTIAL)
    assert len(ds) == len(ds.case_ids) == 3
    k = MODEL.patch.size
    for i, case_id in enumerate(ds.case_ids):
        row = ds[i]
        assert list(row) == list(ROW_KEYS)
        assert row["image_lowres"].shape == (4, *MODEL.lowres_input_shape)
        assert row["points"].shape == (N_POINTS, 3)
        assert row["patches"].shape == (N_POINTS, 4, k, k, k)
        assert row["labels"].shape == (N_POINTS,)
        assert row["label_lowres"].shape == MODEL.latent_shape
        assert all(v.dtype == np.float32 for v in row.values())
        assert row["points"].min() >= -1.0 and row["points"].max() <= 1.0

        image, label = load_validation_case(store, case_id)
        assert image.dtype == np.float32 and image.shape == (4, *GRID)
        assert label.dtype == np.uint8 and label.shape == GRID
        vox = _voxels(row["points"])
        np.testing.assert_array_equal(row["labels"], label[vox[:, 0], vox[:, 1], vox[:, 2]].astype(np.float32))
        padded = np.pad(image, ((0, 0),) + ((k // 2, k // 2),) * 3)
        expected = np.stack([padded[:, x:x + k, y:y + k, z:z + k] for x, y, z in vox])
        np.testing.assert_array_equal(row["patches"], expected)
        np.testing.assert_allclose(row["image_lowres"], downsample_image(image, MODEL.lowres_input_shape), atol=1e-6)
        np.testing.assert_array_equal(row["label_lowres"], lowres_label(label, MODEL.lowres_factor))


def test_border_points_come_from_the_stored_band(store_url: str) -> None:
    ds = _dataset(store_url, AugmentConfig.off(), sampling=SamplingConfig(n_points=N_POINTS, border_ratio=1.0, band_width=2))
    assert ds.spec.stored_band and "border" in ds.spec.arrays
    band = open_store(store_url).read_case(ds.case_ids[0], ("border",))["border"].astype(bool)
    assert band.any()
    vox = _voxels(ds[0]["points"])
    assert band[vox[:, 0], vox[:, 1], vox[:, 2]].all()
    # A band width the store was not built with: derived from the label, same as stored would be.
    derived = _dataset(store_url, AugmentConfig.off(), sampling=SamplingConfig(n_points=N_POINTS, border_ratio=1.0, band_width=3))
    assert not derived.spec.stored_band and derived.spec.arrays == ("image", "label")


def test_stored_and_derived_band_give_the_same_rows(store_url: str) -> None:
    store = open_store(store_url)
    case_id = store.case_ids("train")[0]
    arrays = store.read_case(case_id, ("image", "label", "border"))
    stored = SampleSpec(MODEL, SAMPLING, AugmentConfig(), seed=3, stored_band=True)
    derived = SampleSpec(MODEL, SAMPLING, AugmentConfig(), seed=3, stored_band=False)
    _assert_rows_equal(sample_case_rows(arrays, case_id, 2, stored)[0], sample_case_rows(arrays, case_id, 2, derived)[0])


def test_epochs_differ_and_the_same_seed_reproduces(store_url: str) -> None:
    ds = _dataset(store_url, seed=7)
    epoch0 = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(len(ds))]
    for a, b in zip(epoch0, epoch1):
        assert not np.array_equal(a["points"], b["points"])
    again = _dataset(store_url, seed=7, epoch=1)
    for i in range(len(again)):
        _assert_rows_equal(again[i], epoch1[i])
    other_seed = _dataset(store_url, seed=8)
    assert not np.array_equal(other_seed[0]["points"], epoch0[0]["points"])
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def test_repeats_are_distinct_and_independent_of_samples_per_case(store_url: str) -> None:
    one = _dataset(store_url, seed=5)
    three = _dataset(store_url, seed=5, samples_per_case=3)
    assert len(three) == 3 * len(one)
    for c in range(len(one)):
        _assert_rows_equal(three[3 * c], one[c])
        assert not np.array_equal(three[3 * c]["points"], three[3 * c + 1]["points"])
    with pytest.raises(IndexError):
        three[len(three)]


def test_dataloader_workers_and_collate(store_url: str) -> None:
    ds = _dataset(store_url, seed=11, samples_per_case=2, epoch=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_rows)
    batches = list(loader)
    assert [b["points"].shape[0] for b in batches] == [4, 2]
    first = batches[0]
    assert first["patches"].shape == (4, N_POINTS, 4, 7, 7, 7) and first["patches"].dtype == torch.float32
    assert first["label_lowres"].shape == (4, *MODEL.latent_shape)
    expected = collate_rows([ds[i] for i in range(4)])
    for key, value in expected.items():
        assert torch.equal(first[key], value), key


def test_partial_case_is_never_listed_or_read(store_url: str) -> None:
    store = open_store(store_url)
    assert PARTIAL in store.case_ids("train") and store.case_status(PARTIAL) == "partial"
    assert PARTIAL not in _dataset(store_url).case_ids
    with pytest.raises(ValueError, match=PARTIAL):
        _dataset(store_url, case_ids=[PARTIAL])


def test_bad_arguments_name_the_field(store_url: str) -> None:
    with pytest.raises(ValueError, match="samples_per_case"):
        _dataset(store_url, samples_per_case=0)
    with pytest.raises(ValueError, match="volume_shape"):
        CaseSampleDataset(store_url, "train", model_config("C", "tiny"), SAMPLING, AugmentConfig())
    with pytest.raises(ValueError, match="no complete cases"):
        CaseSampleDataset(store_url, "unassigned", MODEL, SAMPLING, AugmentConfig())
