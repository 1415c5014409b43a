"""MLflow tracking: URI resolution, resumable runs, the pyfunc bundle, the registry, model specs.

Real MLflow on a SQLite database in a temporary directory (no server, no Ray). One database and
one logged bundle are shared by the module, because creating an MLflow database runs its
migrations (seconds); each test uses its own run keys and registered model names.
"""

from __future__ import annotations

import json
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from ossnet.config import model_config
from ossnet_pipelines.figures import lesion_centre, slice_overlay_png
from ossnet_pipelines.tracking import (
    DEFAULT_MODEL_SPEC,
    RUN_KEY_TAG,
    ModelNotFoundError,
    RunLogger,
    TrackingConfigError,
    default_artifact_root,
    flatten_params,
    load_checkpoint_from_mlflow,
    locate_model,
    predict_volume,
    register_and_promote,
    settle_alias,
    resolve_model_uri,
    resolve_tracking_uri,
)

ODD = (37, 41, 29)
CUBE = (30, 30, 30)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _save_tiny_checkpoint(path: Path, seed: int = 0) -> torch.nn.Module:
    from ossnet.checkpoint import PreprocessSpec, save_checkpoint
    from ossnet.model import build_model

    torch.manual_seed(seed)
    cfg = model_config("C", "tiny")
    model = build_model(cfg)
    # Non-trivial batch-norm statistics, so eval-mode outputs depend on the saved buffers.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    spec = PreprocessSpec(modalities=("flair", "t1", "t1ce", "t2"), volume_shape=cfg.volume_shape)
    save_checkpoint(path, model, spec, extra={"epoch": 3})
    return model.eval()


def _volume(shape: tuple[int, int, int], seed: int, channels: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 20.0, size=(channels, *shape)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    centre = [s / 2 for s in shape]
    ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < (min(shape) / 4) ** 2
    image[:, ball] += 80.0
    return image


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A SQLite tracking store in a temporary working directory."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # so that a stray ./mlruns or ./mlflow.db would be seen
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("OSSNET_HOME", raising=False)
        uri = resolve_tracking_uri(f"sqlite:///{root / 'db' / 'mlflow.db'}")
        # For MLflow's own fluent calls in the tests (mlflow.pyfunc.load_model).
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield SimpleNamespace(root=root, uri=uri)


@pytest.fixture(scope="module")
def bundle(store: SimpleNamespace) -> SimpleNamespace:
    """One training-like run that logs a tiny variant-C checkpoint as a pyfunc bundle."""
    ckpt = store.root / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    model = _save_tiny_checkpoint(ckpt)
    with RunLogger("bundle-job", experiment="ossnet-test", tracking_uri=store.uri) as run:
        run.log_params({"model": dataclasses.asdict(model.config)})
        info = run.log_model_bundle(ckpt, name="model")
    return SimpleNamespace(ckpt=ckpt, model=model, run_id=run.run_id, info=info, uri=store.uri)


# ----------------------------------------------------------------------------------- URIs


def test_resolve_tracking_uri_order_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OSSNET_HOME", raising=False)
    default = resolve_tracking_uri(None)
    state = tmp_path.resolve() / ".ossnet"
    assert default == f"sqlite:///{state}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute: four slashes
    assert state.is_dir()
    assert default_artifact_root(default) == state / "mlartifacts"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("") == "http://127.0.0.1:5999"
    assert default_artifact_root("http://127.0.0.1:5999") is None
    # The flag beats the environment; a relative SQLite path is made absolute, its dir created.
    assert resolve_tracking_uri("sqlite:///sub/dir/x.db") == f"sqlite:///{tmp_path.resolve()}/sub/dir/x.db"
    assert (tmp_path / "sub" / "dir").is_dir()
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path.resolve()}/runs.db"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    home = tmp_path / "home"
    monkeypatch.setenv("OSSNET_HOME", str(home))
    assert resolve_tracking_uri(None) == f"sqlite:///{home.resolve()}/mlflow.db"

    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(TrackingConfigError, match="file"):
            resolve_tracking_uri(bad)
    assert not (tmp_path / "mlruns").exists()


def test_flatten_params_nested_dataclass() -> None:
    flat = flatten_params({"model": model_config("C", "tiny"), "lr": 3e-4, "tags": {}, "none": None})
    assert flat["model.variant"] == "C"
    assert flat["model.encoder.channels"] == "[4, 8]"
    assert flat["model.volume_shape"] == "[32, 32, 24]"
    assert flat["model.patch.size"] == "7"
    assert flat["lr"] == "0.0003"
    assert flat["tags"] == "{}" and flat["none"] == "None"
    assert all(isinstance(v, str) for v in flat.values())


# ----------------------------------------------------------------------------------- runs


def test_run_logs_everything_and_a_resumed_run_keeps_its_id(store: SimpleNamespace) -> None:
    from mlflow import MlflowClient

    config_file = store.root / "job.yaml"
    config_file.write_text("model:\n  variant: C\n")
    png = slice_overlay_png(_volume(ODD, 0), np.zeros(ODD, np.uint8), np.zeros(ODD, np.uint8),
                            store.root / "fig.png", "epoch 0")
    key = "train-job-resume"
    with pytest.raises(RuntimeError, match="injected"):
        with RunLogger(key, experiment="ossnet-test", tracking_uri=store.uri) as run:
            assert not run.resumed
            run.log_params({"train": {"epochs": 3, "lr": 1e-3}, "model": {"variant": "C"}})
            run.log_artifact(config_file, "config")
            run.log_figure_png(png, "val/epoch_000.png")
            for epoch in (0, 1):
                run.log_metrics({"loss": 1.0 / (epoch + 1), "val_dice": 0.1 * epoch}, step=epoch)
            first_id = run.run_id
            raise RuntimeError("injected crash")
    client = MlflowClient(store.uri)
    assert client.get_run(first_id).info.status == "FAILED"

    with RunLogger(key, experiment="ossnet-test", tracking_uri=store.uri) as again:
        assert again.resumed and again.run_id == first_id
        assert again.log_params({"train": {"epochs": 3, "lr": 1e-3}, "extra": 1}) == {"extra": "1"}
        # The restart repeats epoch 1: it must not appear twice in the history.
        assert again.log_metrics({"loss": 0.45, "val_dice": 0.12}, step=1) == {}
        assert again.log_metrics({"loss": 0.3, "val_dice": 0.2}, step=2) == {"loss": 0.3, "val_dice": 0.2}

    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_KEY_TAG] == key
    assert run.data.params["train.epochs"] == "3" and run.data.params["extra"] == "1"
    history = client.get_metric_history(first_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert {m.step: m.value for m in history}[1] == 0.5
    paths = {a.path for a in client.list_artifacts(first_id, "config")} | {
        a.path for a in client.list_artifacts(first_id, "val")
    }
    assert paths == {"config/job.yaml", "val/epoch_000.png"}
    # Artifacts go next to the database, never to ./mlruns.
    assert run.info.artifact_uri.startswith((store.root / "db" / "mlartifacts").as_uri())
    local = Path(run.info.artifact_uri.removeprefix("file://")) / "val" / "epoch_000.png"
    assert local.read_bytes()[:8] == PNG_MAGIC
    assert not (store.root / "mlruns").exists() and not (store.root / "mlflow.db").exists()
    assert len(client.search_runs([run.info.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")) == 1


def test_validation_metrics_are_linked_to_the_logged_model_without_repeating_a_step(store: SimpleNamespace) -> None:
    with RunLogger("link-metrics", experiment="ossnet-test", tracking_uri=store.uri) as run:
        for epoch in (1, 2, 3):
            run.log_metrics({"train_loss": 1.0 / epoch, "val_dice": 0.2 * epoch, "val_iou": 0.1 * epoch}, step=epoch)
        model = run.client.create_logged_model(run.client.get_run(run.run_id).info.experiment_id, source_run_id=run.run_id)
        assert run.link_metrics_to_model(model.model_id, "val_", step=2) == pytest.approx({"val_dice": 0.4, "val_iou": 0.2})
        assert run.link_metrics_to_model(model.model_id, "test_", step=2) == {}  # nothing of that name: nothing linked
    linked = {m.key: m for m in run.client.get_logged_model(model.model_id).metrics}
    assert set(linked) == {"val_dice", "val_iou"}
    assert linked["val_dice"].step == 2 and linked["val_dice"].value == pytest.approx(0.4)
    assert linked["val_dice"].run_id == run.run_id
    history = run.client.get_metric_history(run.run_id, "val_dice")
    assert sorted(m.step for m in history) == [1, 2, 3], "linking must not add a second point at step 2"


# --------------------------------------------------------------------------------- bundle


@pytest.fixture(scope="module")
def pyfunc(bundle: SimpleNamespace) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(bundle.info.model_uri)


def test_pyfunc_bundle_predicts_any_volume_size(bundle: SimpleNamespace, pyfunc: Any) -> None:
    from mlflow.exceptions import MlflowException

    assert bundle.info.model_uri.startswith("models:/m-")
    odd = _volume(ODD, 1)
    both = pyfunc.predict(odd, params={"output": "both"})
    mask, prob = both["mask"], both["probability"]
    assert mask.shape == ODD and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert prob.shape == ODD and prob.dtype == np.float32
    assert 0.0 <= float(prob.min()) and float(prob.max()) <= 1.0
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))
    np.testing.assert_array_equal(pyfunc.predict(odd, params={"output": "probability"}), prob)
    with pytest.raises(ValueError, match="output 'probability' needs mode 'dense'"):
        pyfunc.predict(odd, params={"output": "probability", "mode": "mise"})
    cube = pyfunc.predict(_volume(CUBE, 2))
    assert cube.shape == CUBE and cube.dtype == np.uint8
    # The signature refuses what the model cannot take before it runs.
    with pytest.raises(MlflowException, match="Shape of input"):
        pyfunc.predict(_volume(CUBE, 3, channels=2))
    with pytest.raises(MlflowException, match="Shape of input"):
        pyfunc.predict(_volume(CUBE, 3)[0])
    with pytest.raises(MlflowException, match="dtype"):
        pyfunc.predict(_volume(CUBE, 3).astype(np.float64))
    # Called directly, the model also takes the dict form with its options inside.
    direct = pyfunc.unwrap_python_model().predict(None, {"image": odd, "output": "both"})
    np.testing.assert_array_equal(direct["probability"], prob)


def test_pyfunc_bundle_carries_its_signature_and_a_working_input_example(bundle: SimpleNamespace, pyfunc: Any) -> None:
    """Read back from the MLflow store: the input spec, the params, and an example that predicts."""
    import mlflow
    from mlflow.models import Model

    from ossnet_pipelines.tracking.pyfunc_model import INPUT_EXAMPLE_SIDE, PARAM_DEFAULTS

    channels = bundle.model.config.encoder.in_channels
    logged = mlflow.models.get_model_info(bundle.info.model_uri)
    (spec,) = logged.signature.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (channels, -1, -1, -1)
    assert {p.name for p in logged.signature.params.params} == set(PARAM_DEFAULTS)
    local = mlflow.artifacts.download_artifacts(bundle.info.model_uri)
    example = Model.load(local).load_input_example(local)
    side = INPUT_EXAMPLE_SIDE
    assert example.shape == (channels, side, side, side) and example.dtype == np.float32
    out = pyfunc.predict(example)
    assert out.shape == (side, side, side) and out.dtype == np.uint8


def test_the_bundle_code_imports_where_the_project_is_not_installed(bundle: SimpleNamespace, tmp_path: Path) -> None:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(bundle.info.model_uri, dst_path=str(tmp_path / "bundle")))
    code = local / "code"
    assert sorted(p.name for p in code.iterdir()) == ["ossnet", "ossnet_pipelines"]
    # Without the install's import hook and away from the checkout, the bundle's own copy is imported.
    script = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              f"sys.path.insert(0, {str(code)!r}); import ossnet_pipelines.tracking.pyfunc_model as m; print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(code)


def test_library_loader_loads_the_same_bundle_with_identical_outputs(
    bundle: SimpleNamespace, pyfunc: Any, tmp_path: Path
) -> None:
    model, info = load_checkpoint_from_mlflow(bundle.info.model_uri, bundle.uri, dst_dir=tmp_path)
    for name, tensor in bundle.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    from ossnet_pipelines.tracking.predict import make_inferer

    image = _volume(ODD, 1)
    ours = predict_volume(model, image, preprocess=info.preprocess)
    np.testing.assert_array_equal(ours.mask, pyfunc.predict(image, params={"output": "mask"}))
    assert ours.mode == "mise_lowres" and ours.mask.shape == ODD
    # A probability output decodes densely (MISE's map is a probability only where it decoded).
    dense = predict_volume(model, image, make_inferer(model, mode="dense"), preprocess=info.preprocess)
    np.testing.assert_array_equal(dense.probability, pyfunc.predict(image, params={"output": "probability"}))

    # The run id, runs:/ URI and logged-model URI all lead to the same checkpoint bytes.
    digest = hashlib.sha256(bundle.ckpt.read_bytes()).hexdigest()
    for spec in (bundle.run_id, f"runs:/{bundle.run_id}/model", bundle.info.model_uri):
        path = resolve_model_uri(spec, bundle.uri, dst_dir=tmp_path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, spec
    # A local checkpoint path passes through unchanged.
    assert resolve_model_uri(str(bundle.ckpt), bundle.uri) == bundle.ckpt.resolve()


# LPS-like, permuted, anisotropic: the batch job reorients it; the pyfunc must too.
NON_RAS = np.array([[0.0, -1.1, 0.0, 30.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 0.0, 1.6, -5.0], [0.0, 0.0, 0.0, 1.0]])


def _batch_job(tmp_path: Path, ckpt: bytes, spec: Any, image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What ``ossnet infer`` writes for the scan (its per-case stages, without Ray): mask, probability.

    Dense decoding: the untrained model needs a custom cut, and MISE's refinement depends on the
    threshold it runs at, dense decoding does not."""
    import nibabel as nib

    from ossnet_pipelines.infer.cases import InferCase
    from ossnet_pipelines.infer.outputs import OutputLayout
    from ossnet_pipelines.infer.stages import CasePredictor, StageContext, process_case

    paths = []
    for c, mod in enumerate(spec.modalities):
        paths.append((mod, str(tmp_path / f"scan_{mod}.nii.gz")))
        nib.save(nib.Nifti1Image(image[c], NON_RAS), paths[-1][1])
    layout = OutputLayout(str(tmp_path / "out"))
    layout.prepare(True, False)
    ctx = StageContext(modalities=spec.modalities, volume_shape=spec.volume_shape, zscore_mask=spec.zscore_mask,
                       outputs=layout, save_probabilities=True, resample=spec.resample,
                       target_spacing=spec.target_spacing, threshold=threshold)
    result = process_case(InferCase("scan", images=tuple(paths)), ctx, CasePredictor(ckpt, mode="dense"))
    assert result.status == "ok", result.error
    out = nib.load(result.mask)
    assert np.allclose(out.affine, NON_RAS)
    return np.asarray(out.dataobj), np.asarray(nib.load(layout.probability("scan")).dataobj)


def test_pyfunc_and_batch_job_give_identical_masks_for_a_non_ras_scan(
    bundle: SimpleNamespace, pyfunc: Any, tmp_path: Path
) -> None:
    from ossnet.checkpoint import load_checkpoint

    _, info = load_checkpoint(bundle.ckpt)
    image = _volume(ODD, 4)
    affine = NON_RAS.ravel().tolist()
    prob = pyfunc.predict(image, params={"affine": affine, "output": "probability", "mode": "dense"})
    threshold = float(np.quantile(prob, 0.8))  # an untrained model: any non-trivial cut
    mask, probability = _batch_job(tmp_path, bundle.ckpt.read_bytes(), info.preprocess, image, threshold)
    np.testing.assert_array_equal(prob, probability)
    ours = pyfunc.predict(image, params={"affine": affine, "threshold": threshold, "mode": "dense"})
    assert ours.shape == ODD and 0 < ours.sum() < ours.size
    np.testing.assert_array_equal(ours, mask)
    # Without the affine the array is taken as RAS: the model sees another grid.
    assert not np.array_equal(pyfunc.predict(image, params={"output": "probability", "mode": "dense"}), probability)
    with pytest.raises(ValueError, match="16 numbers"):
        pyfunc.predict(image, params={"affine": affine[:12]})


def test_resampling_model_gives_the_same_mask_through_predict_volume_and_the_batch_job(
    bundle: SimpleNamespace, tmp_path: Path
) -> None:
    import io

    from ossnet.checkpoint import PreprocessSpec, checkpoint_bytes, load_checkpoint
    from ossnet_pipelines.tracking.predict import make_inferer

    spec = PreprocessSpec(modalities=("flair", "t1", "t1ce", "t2"), volume_shape=bundle.model.config.volume_shape,
                          resample="spacing", target_spacing=(1.0, 1.0, 1.0))
    ckpt = checkpoint_bytes(bundle.model, spec)
    model, info = load_checkpoint(io.BytesIO(ckpt))
    image = _volume(ODD, 5)
    probability = predict_volume(model, image, make_inferer(model, mode="dense"), preprocess=info.preprocess,
                                 affine=NON_RAS).probability
    threshold = float(np.quantile(probability, 0.8))
    ours = predict_volume(model, image, make_inferer(model, mode="dense", threshold=threshold),
                          preprocess=info.preprocess, affine=NON_RAS)
    mask, batch_probability = _batch_job(tmp_path, ckpt, info.preprocess, image, threshold)
    np.testing.assert_array_equal(ours.probability, batch_probability)
    np.testing.assert_array_equal(ours.mask, mask)
    assert ours.mask.shape == ODD and 0 < ours.mask.sum() < ours.mask.size


# ------------------------------------------------------------------------------- registry


def test_champion_alias_moves_only_on_improvement(bundle: SimpleNamespace, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(bundle.uri, registry_uri=bundle.uri)
    name = "ossnet-champion-test"
    results = []
    for dice in (0.5, 0.4, 0.7, None, float("nan")):
        promotion = register_and_promote(bundle.info.model_uri, name, dice, "test_dice.x", tracking_uri=bundle.uri,
                                         tags={"val_dice": 0.9})
        champion = client.get_model_version_by_alias(name, "champion")
        results.append((promotion.version, promotion.promoted, int(champion.version)))
        assert promotion.champion == int(champion.version) and "\n" not in promotion.message
    # Unscored versions (None, NaN) are registered and never take the alias.
    assert results == [(1, True, 1), (2, False, 1), (3, True, 3), (4, False, 3), (5, False, 3)]
    assert float(client.get_model_version(name, "2").tags["test_dice.x"]) == 0.4
    assert client.get_model_version(name, "2").tags["val_dice"] == "0.9"
    assert "test_dice.x" not in client.get_model_version(name, "4").tags
    loc = locate_model(f"models:/{name}@champion", bundle.uri)
    assert (loc.kind, loc.name, loc.version) == ("registry", name, 3)
    path = resolve_model_uri(f"models:/{name}@champion", bundle.uri, dst_dir=tmp_path)
    assert path.read_bytes() == bundle.ckpt.read_bytes()
    # A second resolution of the same version is served from the cache.
    assert resolve_model_uri(f"models:/{name}/3", bundle.uri, dst_dir=tmp_path) == path


def test_a_promoter_that_set_the_alias_from_a_stale_read_corrects_it(bundle: SimpleNamespace) -> None:
    """The compare-and-set MLflow lacks: the rule is re-checked after every write.

    Two promoters raced: v1 (0.9) was registered and promoted, then the loser, which had read
    the registry before v1 existed, moved the alias to its own v2 (0.6). Settling again (what
    the loser does right after its write) gives the alias back to the better version.
    """
    from mlflow import MlflowClient

    client = MlflowClient(bundle.uri, registry_uri=bundle.uri)
    name = "ossnet-race-test"
    assert register_and_promote(bundle.info.model_uri, name, 0.9, "test_dice.s", tracking_uri=bundle.uri).promoted
    second = register_and_promote(bundle.info.model_uri, name, 0.6, "test_dice.s", tracking_uri=bundle.uri)
    assert (second.version, second.promoted, second.champion) == (2, False, 1)
    client.set_registered_model_alias(name, "champion", "2")  # the stale write
    assert settle_alias(client, name, "test_dice.s") == (1, "")
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    # Versions scored on other cases do not compete; a holder without a score on these cases
    # is scored first (here: rescored low, so the better v3 takes the alias) ...
    client.set_registered_model_alias(name, "champion", "2")
    third = register_and_promote(bundle.info.model_uri, name, 0.7, "test_dice.other", tracking_uri=bundle.uri,
                                 rescore=lambda version: {2: 0.1}[version])
    assert (third.version, third.promoted) == (3, True)
    assert client.get_model_version(name, "2").tags["test_dice.other"] == "0.1"
    # ... and one that cannot be scored on them keeps the alias, with the reason given.
    client.set_registered_model_alias(name, "champion", "1")
    fourth = register_and_promote(bundle.info.model_uri, name, 0.95, "test_dice.other", tracking_uri=bundle.uri,
                                  rescore=lambda version: None)
    assert (fourth.promoted, fourth.champion) == (False, 1)
    assert "could not be scored" in fourth.message


def test_resolution_ignores_the_process_wide_tracking_uri(
    bundle: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registration and models:/ resolution use the URI passed in, even when MLflow's globals point elsewhere."""
    import mlflow

    name = "ossnet-global-uri-test"
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(elsewhere)
    try:
        promotion = register_and_promote(bundle.info.model_uri, name, 0.5, "test_dice", tracking_uri=bundle.uri)
        assert (promotion.version, promotion.promoted) == (1, True)
        assert mlflow.get_tracking_uri() == elsewhere
        for spec in (f"models:/{name}@champion", f"models:/{bundle.info.model_id}", bundle.run_id):
            path = resolve_model_uri(spec, bundle.uri, dst_dir=tmp_path / "cache")
            assert path.read_bytes() == bundle.ckpt.read_bytes(), spec
    finally:
        mlflow.set_tracking_uri(previous)


def test_resolve_model_uri_fails_clearly_before_any_work(bundle: SimpleNamespace, tmp_path: Path) -> None:
    name = "ossnet-errors-test"
    register_and_promote(bundle.info.model_uri, name, 0.5, "test_dice", tracking_uri=bundle.uri)
    cache = tmp_path / "cache"
    cases = {
        "models:/no-such-model@champion": "no-such-model",
        f"models:/{name}@staging": "staging",
        f"models:/{name}/7": "version 7",
        "0123456789abcdef0123456789abcdef": "0123456789abcdef0123456789abcdef",
        "models:/m-0123456789abcdef": "m-0123456789abcdef",
        str(tmp_path / "missing.pt"): "missing.pt",
    }
    for spec, needle in cases.items():
        with pytest.raises(ModelNotFoundError, match=needle) as err:
            resolve_model_uri(spec, bundle.uri, dst_dir=cache)
        assert "\n" not in str(err.value), spec
    with pytest.raises(ValueError, match="stages are not supported"):
        locate_model(f"models:/{name}/Production", bundle.uri)
    assert not cache.exists() or not any(cache.iterdir())
    # A default store that was never created is reported, not created empty.
    missing_db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(ModelNotFoundError, match="no MLflow database"):
        locate_model(DEFAULT_MODEL_SPEC, f"sqlite:///{missing_db}")
    assert not missing_db.exists()


# -------------------------------------------------------------------------------- figures


def test_slice_overlay_png_writes_a_png_through_the_lesion(tmp_path: Path) -> None:
    image = _volume(ODD, 5)
    reference = np.zeros(ODD, np.uint8)
    reference[20:25, 10:15, 3:8] = 1
    prediction = np.zeros(ODD, np.float32)
    prediction[21:26, 10:15, 3:8] = 0.9
    assert lesion_centre(reference, prediction) == (22, 12, 5)
    assert lesion_centre(np.zeros(ODD), None) == (18, 20, 14)
    out = slice_overlay_png(image, reference, prediction, tmp_path / "a" / "case.png", "case 0")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert slice_overlay_png(image[0], None, prediction, tmp_path / "b.png").stat().st_size > 1000
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["case.png"]  # no temporary left
    with pytest.raises(ValueError, match="prediction shape"):
        slice_overlay_png(image, reference, prediction[:-1], tmp_path / "c.png")


# ------------------------------------------------------------------------------- lineage


def test_a_run_records_its_store_as_a_dataset_input(tmp_path: Path) -> None:
    from ossnet_pipelines.store import open_store
    from ossnet_pipelines.synthetic import write_phantom_store
    from ossnet_pipelines.tracking.lineage import log_store_input, store_digest

    store = write_phantom_store(tmp_path / "data", (1, 2, 3, 4), test_fraction=0.25)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with RunLogger("lineage", experiment="lineage-test", tracking_uri=uri) as run:
        log_store_input(run, store)
        log_store_input(run, store)  # a resumed run records the same input once
    (entry,) = run.client.get_run(run.run_id).inputs.dataset_inputs
    dataset = entry.dataset
    assert dataset.name == "store.zarr" and dataset.digest == store_digest(open_store(store))
    assert json.loads(dataset.source)["uri"].rstrip("/") == store.rstrip("/")
    profile = json.loads(dataset.profile)
    assert profile["cases_per_split"] == {"test": 1, "train": 2, "val": 1} and profile["cases"] == 4
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]

    # Any change to the scans or the splits changes the digest.
    before = store_digest(open_store(store))
    writable = open_store(store, mode="r+")
    writable.write_manifest({**writable.manifest, "brats-1": "val"}, {"method": "test"})
    assert store_digest(open_store(store)) != before


def test_system_metrics_are_logged_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with RunLogger("sysmetrics", experiment="sysmetrics-test", tracking_uri=uri, log_system_metrics=True) as run:
        deadline = time.monotonic() + 30
        while not any(k.startswith("system/") for k in run.client.get_run(run.run_id).data.metrics):
            assert time.monotonic() < deadline, "no system metric within 30 s"
            time.sleep(0.2)
    metrics = run.client.get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    with RunLogger("plain", experiment="sysmetrics-test", tracking_uri=uri) as plain:
        time.sleep(1.0)
    assert not [k for k in plain.client.get_run(plain.run_id).data.metrics if k.startswith("system/")]
