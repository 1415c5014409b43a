"""ossnet_pipelines.data, Ray path: the streaming dataset matches the torch Dataset, epochs, splits."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from ossnet.config import AugmentConfig, SamplingConfig, model_config
from ossnet_pipelines.data import ROW_KEYS, CaseSampleDataset, EpochClock, build_training_dataset, ingest_options
from ossnet_pipelines.store import open_store
from ossnet_pipelines.synthetic import write_phantom_store

pytestmark = pytest.mark.ray

MODEL = model_config("C", "tiny")  # 32 x 32 x 24 grid
SAMPLING = SamplingConfig(n_points=256, border_ratio=0.5, band_width=6)
AUGMENT = AugmentConfig()
PARTIAL = "brats-partial"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four phantoms (37x41x29 sources) ingested onto the tiny grid, plus a listed partial case."""
    root = tmp_path_factory.mktemp("ray-data")
    url = write_phantom_store(root, range(200, 204))
    store = open_store(url, mode="r+")
    store.case_writer(PARTIAL).write_array("label", np.full(MODEL.volume_shape, 7, dtype=np.uint8))
    store.write_manifest({**store.manifest, PARTIAL: "train"}, store.attrs["manifest"]["splits"])
    return url


def _torch_rows(url: str, epoch: int, seed: int, samples_per_case: int) -> list[dict[str, np.ndarray]]:
    ds = CaseSampleDataset(url, "train", MODEL, SAMPLING, AUGMENT, seed=seed, samples_per_case=samples_per_case, epoch=epoch)
    return [ds[i] for i in range(len(ds))]


def _assert_same_rows(got: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    """Equal as multisets (streaming order is not deterministic)."""
    assert len(got) == len(expected)

    def key(row: dict[str, np.ndarray]) -> bytes:
        return np.asarray(row["points"]).tobytes()

    for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert set(a) == set(b) == set(ROW_KEYS)
        for k in ROW_KEYS:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=k)


def test_rows_have_the_training_layout_and_match_the_torch_dataset(ray_session: Any, store_url: str) -> None:
    ds = build_training_dataset(store_url, "train", MODEL, SAMPLING, AUGMENT, epoch=3, seed=9, samples_per_case=2)
    rows = ds.take_all()
    assert len(rows) == 3 * 2  # three complete training cases; the partial one is never read
    row = rows[0]
    assert row["image_lowres"].shape == (4, *MODEL.lowres_input_shape)
    assert row["points"].shape == (256, 3)
    assert row["patches"].shape == (256, 4, 7, 7, 7)
    assert row["labels"].shape == (256,)
    assert row["label_lowres"].shape == MODEL.latent_shape
    assert all(np.asarray(v).dtype == np.float32 for v in row.values())
    _assert_same_rows(rows, _torch_rows(store_url, epoch=3, seed=9, samples_per_case=2))


def test_iter_torch_batches(ray_session: Any, store_url: str) -> None:
    ds = build_training_dataset(store_url, "train", MODEL, SAMPLING, AUGMENT, epoch=0, seed=1, samples_per_case=2,
                                options=ingest_options(object_store_memory=64 << 20, cpus=2))
    batches = list(ds.iter_torch_batches(batch_size=4, drop_last=True))
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == set(ROW_KEYS)
    assert batch["patches"].shape == (4, 256, 4, 7, 7, 7)
    assert batch["label_lowres"].shape == (4, *MODEL.latent_shape)
    assert all(v.dtype == torch.float32 for v in batch.values())
    assert set(torch.unique(batch["labels"]).tolist()) <= {0.0, 1.0}


def test_epoch_clock_gives_fresh_reproducible_samples_per_iteration(ray_session: Any, store_url: str) -> None:
    clock = EpochClock.create(epoch=0)
    ds = build_training_dataset(store_url, "train", MODEL, SAMPLING, AUGMENT, epoch=clock, seed=4)
    first = ds.take_all()
    _assert_same_rows(first, _torch_rows(store_url, epoch=0, seed=4, samples_per_case=1))
    clock.set(1)
    second = ds.take_all()
    _assert_same_rows(second, _torch_rows(store_url, epoch=1, seed=4, samples_per_case=1))
    assert not {r["points"].tobytes() for r in first} & {r["points"].tobytes() for r in second}


def test_epoch_clock_reports_the_slowest_rank() -> None:
    # Pure bookkeeping of the actor body; no cluster needed.
    from ossnet_pipelines.data import _EpochCounter

    counter = _EpochCounter(0, world_size=2)
    counter.set(1, rank=0)
    assert counter.get() == 0
    counter.set(1, rank=1)
    assert counter.get() == 1


def test_streaming_split_epochs_as_under_train(ray_session: Any, store_url: str) -> None:
    """Two consumers of ``streaming_split(2, equal=True)`` (what Train V2 hands its workers)."""
    clock = EpochClock.create(epoch=0, world_size=2)
    ds = build_training_dataset(store_url, "train", MODEL, SAMPLING, AUGMENT, epoch=clock, seed=6, samples_per_case=2)
    shards = ds.streaming_split(2, equal=True)
    seen: dict[tuple[int, int], list[dict[str, np.ndarray]]] = {}
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            for epoch in (5, 6):  # e.g. resumed from a checkpoint after epoch 4
                clock.set(epoch, rank=rank)
                seen[rank, epoch] = [
                    {k: v[i] for k, v in batch.items()}
                    for batch in shards[rank].iter_batches(batch_size=2, batch_format="numpy")
                    for i in range(len(batch["labels"]))
                ]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for epoch in (5, 6):
        assert len(seen[0, epoch]) == len(seen[1, epoch]) == 3
        _assert_same_rows(seen[0, epoch] + seen[1, epoch], _torch_rows(store_url, epoch, seed=6, samples_per_case=2))
