"""Batch inference over archives: Ray Data jobs with models from the MLflow registry.

``run_inference(InferJob(input, output, model="models:/ossnet@champion")) -> InferReport`` is the
API; ``configure_infer_parser`` / ``run_infer_cli`` are the ``ossnet infer`` command.

The pipeline (``ossnet_pipelines.infer.run``): list cases (``cases``) -> read + preprocess with the
model's own ``PreprocessSpec`` (CPU tasks) -> MISE prediction on an actor pool (one model per
actor, a GPU each when the cluster has GPUs) -> undo preprocessing + atomic writes + metrics
(CPU tasks) (``stages``) -> report (``outputs``). Masks land in the scan's own geometry
(orientation, shape, affine), so they open over the scan in 3D Slicer or ITK-SNAP.

Importing this package is cheap (no torch, Ray or MLflow); the rest loads on first use.
"""

from __future__ import annotations

from typing import Any

from ossnet_pipelines.infer.job import CaseResult, InferError, InferJob, InferReport

_LAZY = {
    "run_inference": "ossnet_pipelines.infer.run",
    "configure_infer_parser": "ossnet_pipelines.infer.cli",
    "job_from_args": "ossnet_pipelines.infer.cli",
    "run_infer_cli": "ossnet_pipelines.infer.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ossnet_pipelines.infer' has no attribute {name!r}")


__all__ = [
    "CaseResult",
    "InferError",
    "InferJob",
    "InferReport",
    "configure_infer_parser",
    "job_from_args",
    "run_infer_cli",
    "run_inference",
]
