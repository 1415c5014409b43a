"""The sweep's progress: trials done out of the sweep's total, failures, and the best score so far.

A bar in a terminal, periodic log lines elsewhere (``ossnet_pipelines.progress.CaseProgress``),
fed by Tune's callbacks on the driver. A resumed sweep counts the trials it restored as done.
"""

from __future__ import annotations

from typing import Any

import ray.tune

from ossnet_pipelines.progress import CaseProgress

_FINISHED = ("TERMINATED", "ERROR")


class SweepProgress(ray.tune.Callback):
    """Tune callback that reports ``done/total trials (failed), best <metric> so far``.

    Args:
        total: trials in the sweep (``num_samples``).
        metric: the score to show the best of (``val_dice``).
        bar: draw a bar (default: when ``stream`` is a terminal).
        stream: where the bar goes (default stderr).
    """

    def __init__(self, total: int, metric: str, *, bar: bool | None = None, stream: Any = None) -> None:
        self.total = int(total)
        self.metric = metric
        self.bar = bar
        self.stream = stream
        self._finished: dict[str, bool] = {}  # trial id -> failed
        self._progress: CaseProgress | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its run config (callbacks included) with the experiment; a bar and its
        # stream stay with the process that draws them.
        return {**self.__dict__, "_progress": None, "stream": None}

    def _report(self, trials: list[Any]) -> None:
        for trial in trials:
            if trial.status in _FINISHED:
                self._finished.setdefault(trial.trial_id, trial.status == "ERROR")
        scores = [t.metric_analysis.get(self.metric, {}).get("max") for t in trials]
        best = max((s for s in scores if isinstance(s, (int, float))), default=None)
        note = f"best {self.metric} {best:.4f}" if best is not None else ""
        if self._progress is None:
            self._progress = CaseProgress("sweep", self.total, every=1, bar=self.bar, stream=self.stream,
                                          unit="trial")
        self._progress.update_to(len(self._finished), sum(self._finished.values()), note)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self._report(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished[trial.trial_id] = False
        self._report(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished[trial.trial_id] = True
        self._report(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._report(trials)
        if self._progress is not None:
            self._progress.close()


__all__ = ["SweepProgress"]
