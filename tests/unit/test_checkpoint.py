"""Self-describing checkpoints: round trip, atomic write, clear errors for bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from ossnet.checkpoint import (
    FORMAT_TAG,
    CheckpointError,
    PreprocessSpec,
    checkpoint_bytes,
    checkpoint_payload,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from ossnet.config import model_config
from ossnet.model import build_model

MODALITIES = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(model_config("D", "tiny", volume_shape=(21, 19, 17)))
    # Non-trivial batch-norm statistics, so a lost buffer would change the outputs.
    net.train()
    with torch.no_grad():
        cfg = net.config
        x = torch.randn(2, cfg.encoder.in_channels, *cfg.lowres_input_shape)
        pts = torch.rand(2, 40, 3) * 2 - 1
        patches = torch.randn(2, 40, cfg.patch_channels, 7, 7, 7)
        net(x, pts, patches)
    return net.eval()


def _spec(net: torch.nn.Module) -> PreprocessSpec:
    return PreprocessSpec.for_model(net.config, MODALITIES, zscore_mask="nonzero")


def _outputs(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = net.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.encoder.in_channels, *cfg.lowres_input_shape, generator=g)
    pts = torch.rand(1, 33, 3, generator=g) * 2 - 1
    patches = torch.randn(1, 33, cfg.patch_channels, 7, 7, 7, generator=g)
    with torch.no_grad():
        logits, lowres = net.eval()(x, pts, patches)
    return logits, lowres


def test_round_trip_identical_outputs(model: torch.nn.Module, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, _spec(model), extra={"epoch": 3, "dice": 0.5})
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert info.config == model.config
    assert info.preprocess == _spec(model)
    assert info.extra == {"epoch": 3, "dice": 0.5}
    assert info.versions["torch"] == torch.__version__ and "ossnet" in info.versions
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)
    assert torch.equal(_outputs(load_model(path))[0], _outputs(model)[0])
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind


def test_file_object_and_bytes(model: torch.nn.Module) -> None:
    loaded, info = load_checkpoint(io.BytesIO(checkpoint_bytes(model, _spec(model))))
    assert torch.equal(_outputs(loaded)[0], _outputs(model)[0])
    assert info.source == "<BytesIO>"


def test_overwrite_is_atomic_replace(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, _spec(model), extra={"v": 1})
    save_checkpoint(path, model, _spec(model), extra={"v": 2})
    assert load_checkpoint(path)[1].extra == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        load_checkpoint(path)


def test_truncated_and_corrupt_files(model: torch.nn.Module, tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", model, _spec(model)).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: unreadable checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(empty)


def test_foreign_torch_files(model: torch.nn.Module, tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare.pt: not an ossnet checkpoint.*bare state_dict"):
        load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "weights": [torch.zeros(2)]}, other)
    with pytest.raises(CheckpointError, match="other.pt: not an ossnet checkpoint"):
        load_checkpoint(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT_TAG, "obj": Path("x")}, pickled)  # arbitrary object: unsafe to load
    with pytest.raises(CheckpointError, match="pickled.pt: holds objects other than tensors"):
        load_checkpoint(pickled)


def test_wrong_format_version(model: torch.nn.Module, tmp_path: Path) -> None:
    payload = checkpoint_payload(model, _spec(model))
    payload["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="future.pt: checkpoint format version 99"):
        load_checkpoint(path)


def test_config_not_matching_weights(model: torch.nn.Module, tmp_path: Path) -> None:
    payload = checkpoint_payload(model, _spec(model))
    payload["model_config"]["decoder"]["hidden"] = 48
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="mismatch.pt: model config does not match the weights"):
        load_checkpoint(path)
    payload = checkpoint_payload(model, _spec(model))
    payload["model_config"]["variant"] = "Z"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="mismatch.pt: model.variant"):
        load_checkpoint(path)


def test_spec_validation_and_model_fit(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preprocess.normalization"):
        PreprocessSpec(MODALITIES, (21, 19, 17), normalization="minmax")
    with pytest.raises(ValueError, match="preprocess.modalities"):
        PreprocessSpec(("t1", "t1"), (21, 19, 17))
    with pytest.raises(ValueError, match="preprocess.modalities: 1 channels"):
        save_checkpoint(tmp_path / "x.pt", model, PreprocessSpec(("ct",), (21, 19, 17)))
    with pytest.raises(ValueError, match="extra: must be JSON-compatible"):
        save_checkpoint(tmp_path / "x.pt", model, _spec(model), extra={"t": torch.zeros(1)})
    assert not (tmp_path / "x.pt").exists()
    spec = _spec(model)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown field"):
        PreprocessSpec.from_dict({**spec.to_dict(), "spacing": [1, 1, 1]})
