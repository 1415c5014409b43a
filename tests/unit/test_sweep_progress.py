"""The sweep's progress reporter, fed the trial lists Tune's callbacks receive."""
from __future__ import annotations

import io
import logging
import pickle
from types import SimpleNamespace

import pytest

from ossnet_tune.progress import SweepProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trial(trial_id: str, status: str, best: float | None = None) -> SimpleNamespace:
    analysis = {"val_dice": {"max": best}} if best is not None else {}
    return SimpleNamespace(trial_id=trial_id, status=status, metric_analysis=analysis)


def test_a_terminal_gets_one_bar_with_failures_and_the_best_score() -> None:
    terminal = Terminal()
    progress = SweepProgress(3, "val_dice", stream=terminal)
    a, b, c = _trial("a", "RUNNING", 0.5), _trial("b", "RUNNING"), _trial("c", "PENDING")
    progress.on_trial_result(1, [a, b, c], a, {"val_dice": 0.5})
    a.status, a.metric_analysis = "TERMINATED", {"val_dice": {"max": 0.8}}
    progress.on_trial_complete(2, [a, b, c], a)
    b.status = "ERROR"
    progress.on_trial_error(3, [a, b, c], b)
    assert pickle.loads(pickle.dumps(progress))._progress is None  # Tune saves its callbacks
    c.status, c.metric_analysis = "TERMINATED", {"val_dice": {"max": 0.7}}
    progress.on_experiment_end([a, b, c])
    drawn = terminal.getvalue()
    assert "sweep" in drawn and "3/3" in drawn and "failed=1" in drawn and "best val_dice 0.8000" in drawn


def test_a_log_gets_a_line_per_finished_trial_and_a_resumed_sweep_counts_its_restored_trials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_file = io.StringIO()
    progress = SweepProgress(4, "val_dice", stream=log_file)
    restored = [_trial("a", "TERMINATED", 0.6), _trial("b", "ERROR")]
    running = _trial("c", "RUNNING", 0.4)
    with caplog.at_level(logging.INFO, logger="ossnet_pipelines.progress"):
        progress.on_trial_result(1, [*restored, running], running, {"val_dice": 0.4})
        progress.on_trial_result(2, [*restored, running], running, {"val_dice": 0.4})  # nothing finished: no line
        running.status, running.metric_analysis = "TERMINATED", {"val_dice": {"max": 0.9}}
        progress.on_trial_complete(3, [*restored, running], running)
    assert log_file.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["sweep: 2/4 trials done (1 failed)", "sweep: 3/4 trials done (1 failed)"]
    assert lines[0].endswith("best val_dice 0.6000") and lines[1].endswith("best val_dice 0.9000")
