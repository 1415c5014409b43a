"""Distributed training of OSS-Net: Ray Train V2 (TorchTrainer, DDP) with MLflow tracking.

Modules:
    job: ``TrainJob`` (YAML + overrides -> frozen dataclass), the default run name, store checks.
    driver: ``train(job) -> TrainResult``: the TorchTrainer driver, MLflow run, model registry.
    loop: the per-worker loop (resume, epochs, validation, checkpoints, fault injection).
    validation: dense MISE Dice/IoU and auxiliary metrics on the validation cases, PNGs.
    state: checkpoint directories (model.pt + optimiser/scheduler/scaler/RNG state).
    cli: ``ossnet train`` (runs here, or submits itself to a cluster with ``--address``).

Importing this package does not import Ray or MLflow.
"""

from __future__ import annotations

from typing import Any

from ossnet_pipelines.train.job import TrainJob, load_train_job

__all__ = ["TrainJob", "TrainResult", "configure_train_parser", "load_train_job", "run_train_cli", "train"]


def __getattr__(name: str) -> Any:
    # The driver imports torch and the Ray-facing modules: load it on first use only.
    if name in ("train", "TrainResult"):
        from ossnet_pipelines.train import driver

        return getattr(driver, name)
    if name in ("configure_train_parser", "run_train_cli"):
        from ossnet_pipelines.train import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'ossnet_pipelines.train' has no attribute {name!r}")
