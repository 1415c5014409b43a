"""ossnet_pipelines.store: layout, atomic per-case commit, manifest, fsspec URLs, pickling."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from ossnet_pipelines.store import (
    CaseNotFoundError,
    StoreError,
    chunk_layout,
    create_store,
    open_store,
    validate_case_id,
)

INFO = {
    "layout": "generic", "modalities": ["a", "b"], "volume_shape": [37, 41, 29], "lowres_shape": [19, 21, 15],
    "latent_shape": [5, 6, 4], "lowres_factor": 8, "band_width": 6, "zscore_mask": "all", "preset": "tiny",
}


def _write_case(store, case_id: str, rng: np.random.Generator, commit: bool = True) -> dict[str, np.ndarray]:
    image = rng.normal(size=(2, 37, 41, 29)).astype(np.float16)
    label = (rng.random((37, 41, 29)) > 0.8).astype(np.uint8)
    writer = store.case_writer(case_id)
    writer.create_array("image", image.shape, np.float16)
    for c in range(2):
        writer.write("image", image[c], (c,))
    writer.write_array("label", label)
    if commit:
        writer.commit({"spacing": [1.0, 1.0, 2.5]})
    return {"image": image, "label": label}


@pytest.fixture(params=["local", "file", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "s.zarr")
    if request.param == "file":
        return f"file://{tmp_path / 's.zarr'}"
    return f"memory://ossnet-test-{uuid.uuid4().hex}/s.zarr"


def test_write_commit_read_round_trip(url: str) -> None:
    rng = np.random.default_rng(0)
    store = create_store(url, INFO)
    data = _write_case(store, "case-1", rng)
    store.write_manifest({"case-1": "train"}, {"method": "test"})

    reader = open_store(url)
    assert reader.case_ids() == ["case-1"] and reader.case_ids("train") == ["case-1"] and reader.case_ids("val") == []
    assert reader.volume_shape == (37, 41, 29) and reader.modalities == ("a", "b") and reader.band_width == 6
    got = reader.read_case("case-1", ("image", "label"))
    np.testing.assert_array_equal(got["image"], data["image"])
    np.testing.assert_array_equal(got["label"], data["label"])
    assert got["image"].dtype == np.float16 and got["label"].dtype == np.uint8
    attrs = reader.case_attrs("case-1")
    assert attrs["complete"] is True and attrs["spacing"] == [1.0, 1.0, 2.5]
    assert attrs["arrays"] == ["image", "label"]
    np.testing.assert_array_equal(reader.open_array("case-1", "label")[3:9, 0, 0], data["label"][3:9, 0, 0])


def test_arrays_are_sharded_blosc_zstd(tmp_path: Path) -> None:
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    _write_case(store, "c", np.random.default_rng(1))
    arr = zarr.open_array(str(tmp_path / "s.zarr"), path="cases/c/image", mode="r")
    codecs = arr.metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    inner = codecs[0]["configuration"]["codecs"]
    assert inner[-1]["name"] == "blosc" and inner[-1]["configuration"]["cname"] == "zstd"
    assert arr.chunks == (1, 37, 41, 29)  # small volume: one chunk per channel


def test_chunk_layout_shards_are_multiples_of_chunks() -> None:
    chunks, shards = chunk_layout((4, 256, 256, 160), 1)
    assert chunks == (1, 64, 64, 64) and shards == (1, 128, 128, 128)
    chunks, shards = chunk_layout((37, 41, 29), 0)
    assert chunks == (37, 41, 29) and shards == chunks
    chunks, shards = chunk_layout((100, 70, 65), 0)
    assert all(s % c == 0 for s, c in zip(shards, chunks)) and shards == (128, 128, 128)


def test_partial_case_is_never_read(url: str) -> None:
    rng = np.random.default_rng(2)
    store = create_store(url, INFO)
    _write_case(store, "done", rng)
    _write_case(store, "killed", rng, commit=False)  # an ingest killed mid-case
    store.write_manifest({"done": "train"}, {})
    reader = open_store(url)
    assert reader.case_status("done") == "complete"
    assert reader.case_status("killed") == "partial"
    assert reader.case_status("never") == "missing"
    assert reader.case_ids() == ["done"]
    with pytest.raises(CaseNotFoundError, match="incomplete"):
        reader.read_case("killed")
    with pytest.raises(CaseNotFoundError, match="incomplete"):
        reader.case_attrs("killed")
    with pytest.raises(CaseNotFoundError, match="no case 'never'"):
        reader.read_case("never")
    scanned = reader.scan_cases()
    assert scanned["done"]["complete"] is True and scanned["killed"]["complete"] is False


def test_writer_exception_removes_partial_case(tmp_path: Path) -> None:
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    with pytest.raises(RuntimeError, match="boom"):
        with store.case_writer("c") as writer:
            writer.write_array("label", np.ones((3, 4, 5), dtype=np.uint8))
            raise RuntimeError("boom")
    assert store.case_status("c") == "missing"


def test_rewriting_a_case_replaces_it(tmp_path: Path) -> None:
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    _write_case(store, "c", np.random.default_rng(3))
    writer = store.case_writer("c")
    assert store.case_status("c") == "partial"  # the old complete version is gone first
    writer.write_array("label", np.zeros((3, 4, 5), dtype=np.uint8))
    writer.commit({})
    assert open_store(str(tmp_path / "s.zarr")).read_case("c", ("label",))["label"].shape == (3, 4, 5)


def test_store_pickles_by_url(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    store = create_store(url, INFO)
    _write_case(store, "c", np.random.default_rng(4))
    store.write_manifest({"c": "val"}, {})
    blob = pickle.dumps(open_store(url))
    assert len(blob) < 1000  # the URL, not the arrays
    clone = pickle.loads(blob)
    assert clone.case_ids("val") == ["c"] and clone.read_case("c", ("label",))["label"].shape == (37, 41, 29)


def test_incompatible_existing_store_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    create_store(url, INFO)
    with pytest.raises(StoreError, match="volume_shape"):
        create_store(url, {**INFO, "volume_shape": [32, 32, 24]})
    create_store(url, {**INFO, "volume_shape": [32, 32, 24]}, overwrite=True)
    assert open_store(url).volume_shape == (32, 32, 24)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no ossnet store"):
        open_store(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an ossnet store"):
        open_store(str(tmp_path / "plain.zarr"))
    with pytest.raises(StoreError, match="not an ossnet store"):
        create_store(str(tmp_path / "plain.zarr"), INFO)
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    with pytest.raises(StoreError, match="read-only"):
        open_store(str(tmp_path / "s.zarr")).case_writer("c")
    with pytest.raises(ValueError, match="unknown split"):
        store.write_manifest({"c": "holdout"}, {})


@pytest.mark.parametrize("bad", ["../x", "..", ".", "a/b", "/abs", ".hidden", "", "x" * 129, "__meta", "a\\b"])
def test_unsafe_case_ids_are_rejected(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a safe store name"):
        validate_case_id(bad)
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    with pytest.raises(ValueError, match="escape the store path"):
        store.case_writer(bad)
    assert not (tmp_path / "x").exists()


def test_safe_case_ids_pass() -> None:
    for ok in ("BraTS20_Training_001", "lits-007", "case.1"):
        assert validate_case_id(ok) == ok


def test_float16_writes_saturate_instead_of_overflowing(tmp_path: Path) -> None:
    store = create_store(str(tmp_path / "s.zarr"), INFO)
    writer = store.case_writer("c")
    writer.create_array("image", (1, 3, 4, 5), np.float16)
    data = np.zeros((3, 4, 5), dtype=np.float32)
    data[0, 0, 0], data[1, 1, 1] = 1e6, -1e6
    writer.write("image", data, (0,))
    writer.commit({})
    image = store.read_case("c", ("image",))["image"]
    assert np.isfinite(image).all() and image[0, 0, 0, 0] == 65504 and image[0, 1, 1, 1] == -65504
