"""Security checks: no arbitrary unpickling, no writes escaping the output folder."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from ossnet.checkpoint import CheckpointError, FORMAT_TAG, PreprocessSpec, load_checkpoint, save_checkpoint
from ossnet.config import model_config
from ossnet.model import build_model
from ossnet.training import make_optimizer, make_scheduler
from ossnet_pipelines.infer.job import InferError
from ossnet_pipelines.infer.outputs import OutputLayout
from ossnet_pipelines.train.state import MODEL_FILE, STATE_FILE, ResumeError, restore_first_good, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ossnet", "ossnet_cli", "pipelines", "tune", "bench")


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT_TAG, "state_dict": _Payload(marker)}, crafted)
    with pytest.raises(CheckpointError, match="crafted.pt"):
        load_checkpoint(crafted)
    assert not marker.exists()

    # The same payload as a training checkpoint's optimiser state: the resume refuses it.
    model = build_model(model_config("A", "tiny"))
    optimizer = make_optimizer(model, "adam")
    scheduler = make_scheduler(optimizer)
    spec = PreprocessSpec(modalities=("a", "b", "c", "d"), volume_shape=model.config.volume_shape)
    folder = write_checkpoint(tmp_path / "checkpoint_epoch_0001", model, optimizer, scheduler, None, epoch=1, seed=0,
                              metrics={}, preprocess=spec, run_name="r")
    torch.save({"epoch": 1, "optimizer": _Payload(marker)}, folder / STATE_FILE)
    with pytest.raises(ResumeError, match="checkpoint_epoch_0001"):
        restore_first_good([folder], model, optimizer, scheduler, None)
    assert not marker.exists()
    # A genuine checkpoint still loads.
    save_checkpoint(tmp_path / MODEL_FILE, model, spec)
    assert load_checkpoint(tmp_path / MODEL_FILE)[1].config == model.config


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every ``torch.load(...)`` call in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_project_passes_weights_only() -> None:
    found, unsafe = 0, []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for line, safe in _torch_load_calls(path):
                found += 1
                if not safe:
                    unsafe.append(f"{path.relative_to(REPO)}:{line}")
    assert found >= 2  # the checkpoint reader and the training state: the scan sees them
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_an_output_subfolder_linked_outside_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "masks")
    with pytest.raises(InferError, match="masks: a symbolic link leading outside the output folder") as err:
        OutputLayout(str(out)).prepare(save_probabilities=False, save_zarr=False)
    assert "\n" not in str(err.value)
    # A link that stays inside, and an output folder that is itself a link, are fine.
    (out / "masks").unlink()
    (out / "real-masks").mkdir()
    os.symlink(out / "real-masks", out / "masks")
    OutputLayout(str(out)).prepare(save_probabilities=True, save_zarr=False)
    os.symlink(out, tmp_path / "out-link")
    OutputLayout(str(tmp_path / "out-link")).prepare(save_probabilities=True, save_zarr=False)
    assert (out / "probabilities").is_dir() and not list(elsewhere.iterdir())
