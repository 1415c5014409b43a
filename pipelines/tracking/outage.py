"""Training through a tracking-server outage.

A training job must not die, or stall for minutes per call, because the MLflow server went
away: :class:`OutageTolerantRun` wraps the training loop's run logger, keeps what it could not
send in order, reports the outage once (and once more when the server is back), and sends the
backlog at the next call that gets through. Each checkpoint also carries the epochs' metrics
(``ossnet_pipelines.train.state``), so a run whose server stayed down until the end is
reconciled by running the same command again (:func:`reconcile_metrics`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from ossnet_pipelines.tracking.runs import RunLogger

logger = logging.getLogger(__name__)

# MLflow's client retries a dead server 7 times with exponential back-off (minutes per call).
# Inside a training job a lost server should cost seconds per epoch: fewer, shorter retries,
# unless the user chose their own.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def fail_fast_on_lost_server() -> None:
    """Set :data:`FAST_FAIL_ENV` in this process where the user has not set the variables, and
    keep urllib3's per-retry warnings (one per request while the server is down) out of the log:
    the outage is reported once by :class:`OutageTolerantRun`."""
    for key, value in FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def is_outage(exc: BaseException) -> bool:
    """Whether a tracking call failed because the server is unreachable or failing (not a bug
    in the call: bad values raise ``ValueError``/``TypeError`` and are not outages)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, MlflowException):
        return False
    return isinstance(exc, (MlflowException, OSError, ConnectionError, TimeoutError)) or \
        type(exc).__module__.startswith(("requests", "urllib3"))


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OutageTolerantRun:
    """Forwards logging calls to a :class:`RunLogger`, surviving an unreachable server.

    Calls are queued and sent in order; when one fails with an outage the rest wait for the
    next call. The first failure is logged once as a warning naming the URI; recovery once.

    Args:
        run: the started run logger.
    """

    def __init__(self, run: "RunLogger") -> None:
        self.run = run
        self.pending: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.down = False
        self.failures = 0

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.pending.append((method, args, kwargs))
        self.flush()

    def flush(self) -> bool:
        """Send the backlog; False when the server is still unreachable."""
        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                getattr(self.run, method)(*args, **kwargs)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failures += 1
                if not self.down:
                    self.down = True
                    logger.warning(
                        "MLflow at %s is unreachable (%s): training goes on and checkpoints keep being written; "
                        "metrics are kept and sent when it is back, or when the same command is run again",
                        self.run.tracking_uri, one_line(exc))
                return False
            self.pending.pop(0)
        if self.down:
            self.down = False
            logger.warning("MLflow at %s is reachable again: the metrics kept meanwhile were sent", self.run.tracking_uri)
        return True

    def start(self) -> None:
        """Start (or resume) the run; queued like the rest when the server is down."""
        self._call("start")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log_metrics", dict(metrics), step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", dict(tags))

    def log_figure(self, png: Any, artifact_file: str) -> None:
        """Log a PNG file; it must stay on disk until sent (see ``pending``)."""
        self._call("log_figure_png", png, artifact_file)


def reconcile_metrics(run: "RunLogger", history: Sequence[Mapping[str, Any]]) -> int:
    """Log the epochs of ``history`` the run does not hold yet (each ``{"epoch": e, ...}``).

    Reads what the server holds first, so nothing is logged twice. Returns the epochs sent.
    """
    run.refresh_logged_steps()
    sent = 0
    for metrics in history:
        epoch = metrics.get("epoch")
        if epoch is None:
            continue
        values = {k: v for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))}
        if run.log_metrics(values, step=int(epoch)):
            sent += 1
    if sent:
        logger.info("MLflow run %s: %d epoch(s) of metrics sent that an outage had kept back", run.run_id, sent)
    return sent


__all__ = ["FAST_FAIL_ENV", "OutageTolerantRun", "fail_fast_on_lost_server", "is_outage", "one_line",
           "reconcile_metrics"]
