"""One MLflow run per training job, resumable by a stable key (rank 0 only).

``RunLogger`` finds the run tagged ``ossnet.run_key = <key>`` in the experiment and continues
it, so a job that is re-run or restarted after a worker crash keeps a single MLflow run.
Per-epoch metrics use ``step=epoch``; on resume, a (metric, step) pair that the run already
holds is not logged again, so the metric history has no repeated epoch.

Params, metrics, tags and artifacts go through an ``MlflowClient`` with the run id (safe from
any thread). The run is also made the active fluent run of the starting thread, because
``mlflow.pyfunc.log_model`` attaches models to the active run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping

from ossnet_pipelines.tracking.tags import PARENT_RUN_TAG, RUN_KEY_TAG
from ossnet_pipelines.tracking.uri import DEFAULT_EXPERIMENT, get_or_create_experiment, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models.model import ModelInfo

logger = logging.getLogger(__name__)

_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,249}$")
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten_params(config: Any, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten nested dicts/dataclasses into ``{"a.b.c": "value"}`` strings for MLflow params.

    Lists and tuples become JSON (``[32, 32, 24]``); None becomes ``"None"``; values longer
    than MLflow's 6000-character limit are truncated with a warning.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out: dict[str, str] = {}
    if not isinstance(config, Mapping):
        if not prefix:
            raise TypeError(f"flatten_params: expected a mapping or dataclass, got {type(config).__name__}")
        return {prefix: _param_value(prefix, config)}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(value, Mapping):
            nested = flatten_params(value, name, sep)
            out.update(nested if nested else {name: "{}"})
        else:
            out[name] = _param_value(name, value)
    return out


def _param_value(name: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = json.dumps([v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in value])
    elif isinstance(value, Path):
        text = value.as_posix()
    else:
        text = str(value)
    if len(text) > _MAX_PARAM_LEN:
        logger.warning("param %s is %d characters long; truncated to %d", name, len(text), _MAX_PARAM_LEN)
        text = text[:_MAX_PARAM_LEN]
    return text


def _client(tracking_uri: str | None) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


class RunLogger:
    """Rank-0 MLflow run of one job: start or resume, params, metrics, artifacts, models, end.

    Use as a context manager; the run ends FINISHED, or FAILED when the block raises (KILLED on
    KeyboardInterrupt). A job resumed later with the same ``run_key`` continues the same run.

    Args:
        run_key: stable identifier of the job (e.g. the Ray Train run name); letters, digits
            and ``._:/@+=-``.
        experiment: experiment name, created with a local artifact location when missing.
        tracking_uri: explicit URI, else ``resolve_tracking_uri(None)``.
        run_name: display name of a new run (default: ``run_key``).
        tags: tags set on the run at every start.
        parent_run_id: parent run (e.g. a sweep), recorded as ``mlflow.parentRunId``.
        log_system_metrics: sample this process's CPU, memory, disk, network (and GPU) use into
            ``system/*`` metrics while the run is active here (MLflow's system metrics).
    """

    def __init__(
        self,
        run_key: str,
        experiment: str = DEFAULT_EXPERIMENT,
        tracking_uri: str | None = None,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        log_system_metrics: bool = False,
    ) -> None:
        if not _RUN_KEY_RE.match(run_key or ""):
            raise ValueError(
                f"run_key: {run_key!r} must be 1-250 characters of letters, digits and ._:/@+=- "
                "starting with a letter or digit"
            )
        self.run_key = run_key
        self.experiment = experiment
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_name = run_name or run_key
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.parent_run_id = parent_run_id
        self.log_system_metrics = log_system_metrics
        self.experiment_id: str | None = None
        self.resumed = False
        self._run_id: str | None = None
        self._client_obj: "MlflowClient | None" = None
        self._logged_steps: dict[str, set[int]] = {}
        self._fluent_active = False
        self._previous_uri: str | None = None
        self._uri_swapped = False
        self._ended = False

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("RunLogger: call start() (or enter the context) first")
        return self._run_id

    @property
    def client(self) -> "MlflowClient":
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def find_run(self) -> str | None:
        """Id of the newest non-deleted run tagged with this ``run_key``, or None."""
        exp_id = self.experiment_id or get_or_create_experiment(self.client, self.experiment, self.tracking_uri)
        runs = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start(self) -> str:
        """Create the run, or resume the one with the same key; returns the run id."""
        import mlflow

        if self._run_id is not None:
            return self._run_id
        self.experiment_id = get_or_create_experiment(self.client, self.experiment, self.tracking_uri)
        run_id = self.find_run()
        tags = {RUN_KEY_TAG: self.run_key, **self.tags}
        if self.parent_run_id:
            tags[PARENT_RUN_TAG] = self.parent_run_id
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            run_id = run.info.run_id
            logger.info("MLflow run %s (%s) started in experiment %r", run_id, self.run_name, self.experiment)
        else:
            self.resumed = True
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
            self._logged_steps = self._last_steps(run_id)
            # A run with nothing logged yet is one the driver created for this process (a Train
            # worker attaching to it): worth a line only when something is really resumed.
            logger.log(logging.INFO if self._logged_steps else logging.DEBUG,
                       "MLflow run %s resumed (key %r, %d metrics already logged)", run_id, self.run_key,
                       len(self._logged_steps))
        self._run_id = run_id
        # The fluent run is needed by mlflow.pyfunc.log_model; it also sets status RUNNING.
        # set_tracking_uri is process-wide (it also sets $MLFLOW_TRACKING_URI): end() restores it.
        self._previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        self._uri_swapped = True
        mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            mlflow.start_run(run_id=run_id, nested=active is not None,
                             log_system_metrics=True if self.log_system_metrics else None)
            self._fluent_active = True
        return run_id

    def _last_steps(self, run_id: str) -> dict[str, set[int]]:
        run = self.client.get_run(run_id)
        return {key: {m.step for m in self.client.get_metric_history(run_id, key)} for key in run.data.metrics}

    def refresh_logged_steps(self) -> None:
        """Re-read which steps of each metric the server holds (another process may have logged)."""
        self._logged_steps = self._last_steps(self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED). Idempotent."""
        import mlflow

        if status not in RUN_STATUSES:
            raise ValueError(f"status: {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self._run_id is None or self._ended:
            return
        self._ended = True
        active = mlflow.active_run()
        if self._fluent_active and active is not None and active.info.run_id == self._run_id:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self._run_id, status=status)
        if self._uri_swapped:
            mlflow.set_tracking_uri(self._previous_uri)
            self._uri_swapped = False
        self._fluent_active = False
        logger.info("MLflow run %s ended: %s", self._run_id, status)

    def __enter__(self) -> "RunLogger":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        try:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception as end_exc:  # the server may be why the block failed: keep the block's error
            logger.warning("MLflow run %s could not be marked ended: %s", self._run_id, " ".join(str(end_exc).split()))

    # ------------------------------------------------------------------------------- logging
    def log_params(self, params: Any) -> dict[str, str]:
        """Log a (nested) config as flattened params; returns what was newly logged.

        On a resumed run, params already present are skipped; a changed value cannot be
        overwritten in MLflow, so it is reported with a warning and left as it was.
        """
        from mlflow.entities import Param

        flat = flatten_params(params)
        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        new = {k: v for k, v in flat.items() if k not in existing}
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning("resumed run %s keeps its original params for: %s", self.run_id, ", ".join(changed))
        if new:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])
        return new

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """Log metrics at ``step`` (the epoch); returns the ones logged.

        A metric that already holds ``step`` (logged before this run was resumed, or earlier by
        this logger) is skipped, so a restart that repeats an epoch does not repeat it in MLflow. Non-numeric values are
        an error; NaN is logged as NaN.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch: list[Metric] = []
        logged: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metric {key!r}: {value!r} is not a number") from exc
            if int(step) in self._logged_steps.get(key, ()):
                continue
            batch.append(Metric(key, number, now, int(step)))
            logged[key] = number
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            for key in logged:
                self._logged_steps.setdefault(key, set()).add(int(step))
        skipped = sorted(set(metrics) - set(logged))
        if skipped:
            logger.debug("step %d of %s already logged; skipped", step, ", ".join(skipped))
        return logged

    def link_metrics_to_model(self, model_id: str, prefix: str, step: int) -> dict[str, float]:
        """Attach this run's metrics named ``<prefix>*`` at ``step`` to the logged model ``model_id``
        (MLflow 3's model metrics: ``get_logged_model(model_id).metrics``, the Models tab).

        The points are re-sent with their original timestamps and values, which MLflow folds into
        the existing run points, so the run's metric history gains no duplicate step. Returns the
        linked metrics (none when the run has no such metric at ``step``).
        """
        from mlflow.entities import Metric

        latest = self.client.get_run(self.run_id).data.metrics
        linked: list[Metric] = []
        for key in sorted(k for k in latest if k.startswith(prefix)):
            points = [m for m in self.client.get_metric_history(self.run_id, key) if m.step == int(step)]
            if points:
                point = points[-1]
                linked.append(Metric(key, point.value, point.timestamp, point.step, model_id=model_id))
        if linked:
            self.client.log_batch(self.run_id, metrics=linked)
        return {m.key: m.value for m in linked}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values become strings)."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents under ``artifact_path``."""
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Write a mapping as JSON or YAML (by the file's extension) into the run's artifacts."""
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_figure_png(self, fig_or_path: Any, artifact_file: str) -> None:
        """Log a matplotlib figure or an existing PNG file as ``artifact_file``."""
        log_figure_png(fig_or_path, artifact_file, run_id=self.run_id, tracking_uri=self.tracking_uri)

    def log_model_bundle(self, checkpoint_path: str | os.PathLike[str], name: str = "model",
                         **kwargs: Any) -> "ModelInfo":
        """Log the checkpoint as a pyfunc bundle attached to this run (see ``log_model_bundle``)."""
        import mlflow

        from ossnet_pipelines.tracking.bundle import log_model_bundle

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(
                f"log_model_bundle: run {self.run_id} is not the active MLflow run of this thread; "
                "call it from the thread that started the RunLogger"
            )
        return log_model_bundle(checkpoint_path, name=name, **kwargs)


def log_figure_png(
    fig_or_path: Any,
    artifact_file: str,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Log a matplotlib ``Figure`` or a PNG file into a run's artifacts as ``artifact_file``.

    Args:
        fig_or_path: a ``matplotlib.figure.Figure`` or the path of an existing image file.
        artifact_file: artifact path inside the run, e.g. ``"val/epoch_003/case_07.png"``.
        run_id: target run; default the active fluent run.
        tracking_uri: tracking URI; default the resolved one.
    """
    import mlflow

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_figure_png: no run_id given and no active MLflow run")
        run_id = active.info.run_id
        client = mlflow.MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
    else:
        client = _client(tracking_uri)
    if isinstance(fig_or_path, (str, os.PathLike)):
        src = Path(fig_or_path)
        if not src.is_file():
            raise FileNotFoundError(f"log_figure_png: {src} is not a file")
        dest_dir, _, dest_name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="ossnet-fig-") as tmp:
            staged = Path(tmp) / dest_name
            shutil.copyfile(src, staged)
            client.log_artifact(run_id, str(staged), dest_dir or None)
    elif hasattr(fig_or_path, "savefig"):
        client.log_figure(run_id, fig_or_path, artifact_file)
    else:
        raise TypeError(f"log_figure_png: expected a matplotlib Figure or a path, got {type(fig_or_path).__name__}")


__all__ = ["PARENT_RUN_TAG", "RUN_KEY_TAG", "RunLogger", "flatten_params", "log_figure_png"]
