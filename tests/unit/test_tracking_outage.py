"""Training through a tracking-server outage (``ossnet_pipelines.tracking.outage``)."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from ossnet_cli import main
from ossnet_pipelines.synthetic import write_phantom_store
from ossnet_pipelines.tracking import RunLogger
from ossnet_pipelines.tracking.outage import OutageTolerantRun, reconcile_metrics
from ossnet_pipelines.tracking.uri import TrackingConfigError, check_reachable


class _FlakyRun:
    """A run logger whose server is down for the calls numbered in ``down``."""

    tracking_uri = "http://127.0.0.1:1"
    run_id = "r"

    def __init__(self, down: set[int]) -> None:
        self.down, self.calls, self.sent = down, 0, []

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls in self.down:
            raise MlflowException("API request to http://127.0.0.1:1 failed: Connection refused")

    def start(self) -> None:
        self._maybe_fail()
        self.sent.append(("start",))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._maybe_fail()
        self.sent.append(("metrics", step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._maybe_fail()
        self.sent.append(("tags",))

    def log_figure_png(self, png: Any, artifact_file: str) -> None:
        self._maybe_fail()
        self.sent.append(("png", artifact_file))


def test_an_outage_is_reported_once_and_the_backlog_sent_in_order(caplog: pytest.LogCaptureFixture) -> None:
    flaky = _FlakyRun(down={2, 3, 4, 5})  # down from the first metrics call for four attempts
    run = OutageTolerantRun(flaky)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        run.start()
        for epoch in (1, 2, 3, 4):
            run.log_metrics({"loss": 1.0 / epoch}, step=epoch)
            if epoch == 2:
                run.log_figure("slice.png", "validation/epoch_0002/x.png")
    assert flaky.sent == [("start",), ("metrics", 1), ("metrics", 2), ("png", "validation/epoch_0002/x.png"),
                          ("metrics", 3), ("metrics", 4)]
    assert not run.pending and not run.down and run.failures == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in m for m in messages) == 1  # once, not once per call
    assert sum("reachable again" in m for m in messages) == 1
    assert all("\n" not in m for m in messages)

    # A bug in a call (a non-numeric metric) is not an outage: it raises.
    class _Broken(_FlakyRun):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            raise ValueError("metric 'x': 'abc' is not a number")

    with pytest.raises(ValueError, match="not a number"):
        OutageTolerantRun(_Broken(set())).log_metrics({"x": 1.0}, step=1)  # type: ignore[arg-type]


def test_reconcile_sends_only_the_epochs_the_server_misses(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    history = [{"epoch": e, "loss": 1.0 / e, "val_dice": 0.1 * e} for e in (1, 2, 3)]
    with RunLogger("outage", experiment="outage-test", tracking_uri=uri) as run:
        run.log_metrics({"loss": 1.0, "val_dice": 0.1}, step=1)
        run.log_metrics({"loss": 1.0 / 3, "val_dice": 0.3}, step=3)  # epoch 2 was logged while the server was down
    with RunLogger("outage", experiment="outage-test", tracking_uri=uri) as again:
        assert reconcile_metrics(again, history) == 1
        assert reconcile_metrics(again, history) == 0
    client = MlflowClient(tracking_uri=uri)
    for key in ("loss", "val_dice"):
        assert sorted(m.step for m in client.get_metric_history(again.run_id, key)) == [1, 2, 3]


def test_an_unreachable_server_is_one_line_naming_the_uri() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingConfigError) as err:
        check_reachable(uri, timeout_s=5)
    assert uri in str(err.value) and "not reachable" in str(err.value) and "\n" not in str(err.value)
    check_reachable("sqlite:///x.db")  # local stores are not probed


def test_training_against_an_unreachable_server_stops_before_any_compute(tmp_path: Path) -> None:
    store = write_phantom_store(tmp_path / "data", (1, 2, 3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    runs = tmp_path / "runs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--set", f"store={store}", "--set", "model.preset=tiny", "--set", f"tracking.uri={uri}",
                     "--set", f"run.storage_path={runs}"])
    assert code == 2
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and uri in lines[0] and "not reachable" in lines[0], err.getvalue()
    assert not runs.exists()  # no Ray Train run, no checkpoint folder
