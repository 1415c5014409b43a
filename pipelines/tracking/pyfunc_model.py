"""The MLflow pyfunc wrapper around an ossnet checkpoint (imported by ``mlflow.pyfunc.load_model``).

The bundle holds the library's own checkpoint as the artifact ``checkpoint``; loading it needs
only ``ossnet.checkpoint.load_checkpoint``, so the pyfunc and the library loader share one file
and one code path (``predict_volume``). No torch.export: any volume size is accepted.

Input: a ``(C, X, Y, Z)`` float32 array (raw intensities; z-scored per the checkpoint's spec).
The logged signature says so (``TensorSpec(float32, (C, -1, -1, -1))`` with the model's channel
count C), so MLflow refuses another channel count, dimensionality or dtype before the model
runs, and the bundle carries a small input example of that form.
Params (a params schema is logged with the model, so ``predict(x, params={...})`` works):
``affine`` (the scan's 4x4 affine as nibabel gives it, flattened to 16 numbers: the model
reorients and resamples the scan exactly as ``ossnet infer`` does; without it the array is
taken as RAS with 1 mm voxels), ``output`` ("mask" -> (X, Y, Z) uint8, "probability" -> float32, "both" -> dict of the two),
``mode`` ("" = mise_lowres when the model has a low-res head, else mise; or dense/mise/
mise_lowres; a probability output always decodes densely: off the surface MISE's map is an
interpolation, not a probability), ``device``, ``chunk_points``, ``threshold`` (0 = the checkpoint's own threshold),
``normalized`` (the input is already z-scored).
Called directly (``OssnetPyfuncModel().predict``, or a bundle logged without a signature), the
input may also be a dict ``{"image": array, "affine": 4x4, <params>...}``; its keys win over
``params``.

Multi-target models (``ossnet.targets``): the mask is the label map in the source's values
(BraTS 0, 1, 2, 4; LiTS 0, 1, 2) and the probability is ``(T, X, Y, Z)``, one map per target;
the model's metadata (``ossnet.targets``) says which value and which map means what.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow.pyfunc
import numpy as np

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
OUTPUTS = ("mask", "probability", "both")
PARAM_DEFAULTS: dict[str, Any] = {
    "output": "mask",
    "mode": "",
    "device": "cpu",
    "chunk_points": 16384,
    "threshold": 0.0,
    "normalized": False,
    "affine": [],
}
INPUT_EXAMPLE_SIDE = 8


def params_schema() -> Any:
    """The ``ParamSchema`` logged with the bundle (so MLflow passes ``params`` through)."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    dtypes = {str: "string", bool: "boolean", int: "long", float: "double"}
    return ParamSchema([ParamSpec(k, "double", v, shape=(-1,)) if isinstance(v, list) else ParamSpec(k, dtypes[type(v)], v)
                        for k, v in PARAM_DEFAULTS.items()])


def input_schema(in_channels: int) -> Any:
    """The input ``Schema``: one ``(in_channels, X, Y, Z)`` float32 volume of any spatial size."""
    from mlflow.types.schema import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(np.float32), (int(in_channels), -1, -1, -1))])


def input_example(in_channels: int) -> np.ndarray:
    """A small valid input, ``(in_channels, 8, 8, 8)`` float32 (seeded noise): what a request looks like."""
    side = INPUT_EXAMPLE_SIDE
    return np.random.default_rng(0).normal(0.0, 1.0, size=(int(in_channels), side, side, side)).astype(np.float32)


class OssnetPyfuncModel(mlflow.pyfunc.PythonModel):
    """Pyfunc model: loads the checkpoint artifact and segments volumes of any size."""

    # MLflow's own switch (set by its ChatModel) to skip wrapping ``predict`` for type-hint
    # validation: inputs are volumes of any shape, validated in ``predict_volume``.
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self._model: Any = None
        self._info: Any = None
        self._device = "cpu"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from ossnet.checkpoint import load_checkpoint

        path = context.artifacts.get(CHECKPOINT_ARTIFACT)
        if path is None:
            raise ValueError(f"ossnet pyfunc: the model has no {CHECKPOINT_ARTIFACT!r} artifact")
        self._model, self._info = load_checkpoint(path, map_location="cpu")
        self._model.eval()
        self._device = "cpu"
        logger.debug("loaded ossnet checkpoint %s (variant %s)", path, self._model.config.variant)

    # ``model_input`` is deliberately left without a type hint: MLflow 3 turns predict's type
    # hints into an enforced input schema, which has no way to say "4D array of any size".
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN001
        """Segment one volume; see the module docstring for input, params and output."""
        from ossnet_pipelines.tracking.predict import make_inferer, predict_volume

        if self._model is None:
            raise RuntimeError("ossnet pyfunc: load_context was not called")
        # MLflow fills ``params`` with the schema defaults, so keys inside a dict input (which
        # the caller wrote explicitly) take precedence over ``params``.
        opts = dict(PARAM_DEFAULTS)
        opts.update({k: v for k, v in (params or {}).items() if k in PARAM_DEFAULTS and v is not None})
        image = model_input
        if isinstance(model_input, dict):
            if "image" not in model_input:
                raise ValueError(f"ossnet pyfunc: dict input needs an 'image' key, got keys {sorted(model_input)}")
            image = model_input["image"]
            opts.update({k: _scalar(v) for k, v in model_input.items() if k in PARAM_DEFAULTS})
        elif hasattr(model_input, "columns"):  # a pandas DataFrame has no natural volume shape
            raise ValueError("ossnet pyfunc: pass a (C, X, Y, Z) numpy array or {'image': array}, not a DataFrame")
        affine = _affine(opts["affine"])
        output = str(opts["output"])
        if output not in OUTPUTS:
            raise ValueError(f"ossnet pyfunc: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        mode = str(opts["mode"])
        if output != "mask":  # off the surface, MISE's map is an interpolation, not a probability
            if mode not in ("", "dense"):
                raise ValueError(f"ossnet pyfunc: output {output!r} needs mode 'dense' (or none), got {mode!r}")
            mode = "dense"
        device = str(opts["device"])
        if device != self._device:
            self._model.to(device)
            self._device = device
        spec = getattr(self._info, "preprocess", None)
        threshold = float(opts["threshold"]) or float(getattr(spec, "threshold", 0.5))
        inferer = make_inferer(self._model, mode=mode or None, device=device,
                               chunk_points=int(opts["chunk_points"]), threshold=threshold)
        result = predict_volume(self._model, np.asarray(image), inferer, preprocess=spec,
                                normalized=bool(opts["normalized"]), affine=affine)
        if output == "mask":
            return result.mask
        if output == "probability":
            return result.probability
        return {"mask": result.mask, "probability": result.probability}


def _affine(value: Any) -> np.ndarray | None:
    """A 4x4 affine from the ``affine`` param (16 numbers, or 4x4), or None when it is empty."""
    arr = np.asarray(value if value is not None else [], dtype=np.float64)
    if arr.size == 0:
        return None
    if arr.size != 16:
        raise ValueError(f"ossnet pyfunc: param 'affine' needs the 16 numbers of a 4x4 matrix, got {arr.size}")
    return arr.reshape(4, 4)


def _scalar(value: Any) -> Any:
    # Values from a JSON request arrive as 0-d or 1-element arrays.
    arr = np.asarray(value)
    return arr.reshape(-1)[0].item() if arr.size == 1 else value


__all__ = ["CHECKPOINT_ARTIFACT", "OssnetPyfuncModel", "PARAM_DEFAULTS", "input_example", "input_schema", "params_schema"]
