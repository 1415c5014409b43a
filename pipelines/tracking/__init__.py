"""MLflow tracking for ossnet: URIs, run logging, model bundles, registry and model resolution.

Importing this package does not import MLflow (each function imports it when called), so the
CLI starts fast; only ``ossnet_pipelines.tracking.pyfunc_model`` imports MLflow at import time.

Modules:
    uri: ``resolve_tracking_uri`` (flag > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<state>/mlflow.db``),
        artifact roots, experiments.
    runs: ``RunLogger`` (one resumable run per job), ``flatten_params``, ``log_figure_png``.
    bundle: ``log_model_bundle`` (pyfunc wrapping the library checkpoint),
        ``load_checkpoint_from_mlflow``.
    registry: ``register_and_promote`` (``champion`` alias), ``locate_model``,
        ``resolve_model_uri``, ``ModelNotFoundError``.
    predict: ``predict_volume`` (any-size volume through a fixed-grid model; MLflow-free).
    pyfunc_model: ``OssnetPyfuncModel`` (the class MLflow unpickles).
"""

from __future__ import annotations

from ossnet_pipelines.tracking.bundle import (
    CHECKPOINT_FILENAME,
    checkpoint_in_model_dir,
    log_model_bundle,
)
from ossnet_pipelines.tracking.predict import VolumePrediction, make_inferer, predict_volume
from ossnet_pipelines.tracking.registry import (
    CHAMPION_ALIAS,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_SPEC,
    ModelLocation,
    ModelNotFoundError,
    Promotion,
    load_checkpoint_from_mlflow,
    locate_model,
    register_and_promote,
    resolve_model_uri,
    settle_alias,
)
from ossnet_pipelines.tracking.runs import RUN_KEY_TAG, RunLogger, flatten_params, log_figure_png
from ossnet_pipelines.tracking.uri import (
    DEFAULT_EXPERIMENT,
    OSSNET_HOME_ENV,
    TrackingConfigError,
    default_artifact_root,
    default_tracking_uri,
    get_or_create_experiment,
    resolve_tracking_uri,
    state_dir,
)

__all__ = [
    "CHAMPION_ALIAS",
    "CHECKPOINT_FILENAME",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_SPEC",
    "ModelLocation",
    "ModelNotFoundError",
    "OSSNET_HOME_ENV",
    "Promotion",
    "RUN_KEY_TAG",
    "RunLogger",
    "TrackingConfigError",
    "VolumePrediction",
    "checkpoint_in_model_dir",
    "default_artifact_root",
    "default_tracking_uri",
    "flatten_params",
    "get_or_create_experiment",
    "load_checkpoint_from_mlflow",
    "locate_model",
    "log_figure_png",
    "log_model_bundle",
    "make_inferer",
    "predict_volume",
    "register_and_promote",
    "resolve_model_uri",
    "resolve_tracking_uri",
    "settle_alias",
    "state_dir",
]
