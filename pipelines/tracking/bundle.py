"""Log an ossnet checkpoint to MLflow as a pyfunc bundle, and load it back with the library.

Bundle layout (an MLflow model directory)::

    MLmodel                      python_function flavor, loader = OssnetPyfuncModel, signature
                                 (input (C, -1, -1, -1) float32 + params), metadata {ossnet: ...}
    input_example.json, serving_input_example.json   a (C, 8, 8, 8) volume
    python_model.pkl             the (stateless) OssnetPyfuncModel, pickled by reference
    artifacts/checkpoint.pt      the library's self-describing checkpoint, unchanged
    code/ossnet, code/ossnet_pipelines  the source, so the bundle loads outside this checkout
    requirements.txt             torch, numpy, scipy, mlflow pins (no slow env inference)

``mlflow.pyfunc.load_model(uri)`` and ``registry.load_checkpoint_from_mlflow(uri)`` (the library's
loader on the downloaded checkpoint) both work on any ``models:/`` or ``runs:/`` URI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

logger = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "checkpoint.pt"
_REQUIREMENTS = ("torch", "numpy", "scipy", "mlflow")


def _pinned(dist: str) -> str:
    try:
        version = importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return dist
    return f"{dist}=={version.split('+', 1)[0]}"  # drop local tags such as +cu130


def bundle_requirements() -> list[str]:
    """Pinned pip requirements of the bundle (the running versions, local tags dropped)."""
    return [_pinned(d) for d in _REQUIREMENTS]


def _code_paths(stage: Path) -> list[str]:
    """Copies of the ``ossnet`` and ``ossnet_pipelines`` sources under ``stage``, each folder named
    as it is imported (``pipelines/`` installs as ``ossnet_pipelines``), so MLflow, which adds
    ``code/`` to ``sys.path``, can import them where the project is not installed."""
    import ossnet
    import ossnet_pipelines

    paths = []
    for package in (ossnet, ossnet_pipelines):
        target = stage / package.__name__
        shutil.copytree(Path(package.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(target))
    return paths


def log_model_bundle(
    checkpoint_path: str | os.PathLike[str],
    name: str = "model",
    *,
    include_code: bool = True,
    pip_requirements: list[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> "ModelInfo":
    """Log a checkpoint as an MLflow pyfunc model attached to the active run.

    The checkpoint is loaded first (a corrupt or foreign file fails here, not at serving time).

    Args:
        checkpoint_path: a file written by ``ossnet.checkpoint.save_checkpoint``.
        name: the logged model's name (``runs:/<run_id>/<name>`` resolves to it).
        include_code: ship the ``ossnet`` and ``ossnet_pipelines`` sources inside the bundle.
        pip_requirements: override the pinned torch/numpy/scipy/mlflow requirements.
        metadata: extra entries for the MLmodel ``metadata`` (e.g. ``{"val_dice": 0.8}``).
        tags: tags on the logged model.
        step: training step/epoch the model belongs to.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).

    Raises:
        FileNotFoundError: no such checkpoint file.
        RuntimeError: no active MLflow run.
    """
    import mlflow
    from mlflow.models import ModelSignature

    from ossnet.checkpoint import load_checkpoint
    from ossnet_pipelines.tracking.pyfunc_model import (
        CHECKPOINT_ARTIFACT,
        OssnetPyfuncModel,
        input_example,
        input_schema,
        params_schema,
    )

    src = Path(checkpoint_path)
    if not src.is_file():
        raise FileNotFoundError(f"log_model_bundle: checkpoint {src} does not exist")
    if mlflow.active_run() is None:
        raise RuntimeError("log_model_bundle: no active MLflow run (use RunLogger or mlflow.start_run)")
    model, _ = load_checkpoint(str(src), map_location="cpu")
    cfg = model.config
    info = {
        "variant": cfg.variant,
        "volume_shape": list(cfg.volume_shape),
        "in_channels": cfg.encoder.in_channels,
        "has_lowres_head": bool(cfg.has_lowres_head),
        "targets": {**cfg.targets.to_dict(), "summary": cfg.targets.describe()},
        "checkpoint": f"artifacts/{CHECKPOINT_FILENAME}",
    }
    with tempfile.TemporaryDirectory(prefix="ossnet-bundle-") as tmp, warnings.catch_warnings():
        # A deliberate choice MLflow would warn about at every log: no predict type hints (the
        # logged signature states the input instead).
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
        staged = Path(tmp) / CHECKPOINT_FILENAME
        shutil.copyfile(src, staged)
        # MLflow warns about pickling a python_model object at every call; ours is stateless and
        # pickled by reference (its class, in the bundle's code), and the weights load with
        # torch.load(weights_only=True).
        # And it says at INFO that it checks the input example against the signature, at every log.
        with _without_log_message("mlflow.pyfunc", "Passing a Python object as `python_model`"), \
                _without_log_message("mlflow.pyfunc", "Validating input example"):
            model_info = mlflow.pyfunc.log_model(
                name=name,
                python_model=OssnetPyfuncModel(),
                artifacts={CHECKPOINT_ARTIFACT: str(staged)},
                code_paths=_code_paths(Path(tmp) / "code") if include_code else None,
                pip_requirements=pip_requirements if pip_requirements is not None else bundle_requirements(),
                signature=ModelSignature(inputs=input_schema(cfg.encoder.in_channels), params=params_schema()),
                input_example=input_example(cfg.encoder.in_channels),
                metadata={"ossnet": info, **dict(metadata or {})},
                tags={str(k): str(v) for k, v in (tags or {}).items()} or None,
                step=step,
            )
    logger.info("logged model bundle %s (%s, run %s)", model_info.model_uri, cfg.variant, model_info.run_id)
    return model_info


@contextlib.contextmanager
def _without_log_message(logger_name: str, text: str) -> Iterator[None]:
    """Drop records of ``logger_name`` containing ``text`` for the duration."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return text not in record.getMessage()

    target, drop = logging.getLogger(logger_name), _Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def checkpoint_in_model_dir(model_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside a downloaded bundle directory (read from its MLmodel).

    Raises:
        FileNotFoundError: not an ossnet bundle (no MLmodel, or no checkpoint artifact).
    """
    from mlflow.models import Model

    from ossnet_pipelines.tracking.pyfunc_model import CHECKPOINT_ARTIFACT

    root = Path(model_dir)
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{root}: not an MLflow model directory (no MLmodel file)")
    conf = Model.load(str(mlmodel)).flavors.get("python_function", {})
    entry = conf.get("artifacts", {}).get(CHECKPOINT_ARTIFACT)
    if not entry or "path" not in entry:
        raise FileNotFoundError(f"{root}: MLflow model without an ossnet {CHECKPOINT_ARTIFACT!r} artifact")
    path = root / entry["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{root}: checkpoint artifact {entry['path']} is missing")
    return path


__all__ = [
    "CHECKPOINT_FILENAME",
    "bundle_requirements",
    "checkpoint_in_model_dir",
    "log_model_bundle",
]
