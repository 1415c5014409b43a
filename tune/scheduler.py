"""ASHA that keeps its rungs across ``Tuner.restore``.

Tune saves the searcher's state with the experiment, but not the scheduler's: after a restore
ASHA starts with empty rungs, so the first trials to report after a resume are never compared
with the ones that finished before the interruption (nothing is stopped early). Tune re-adds
every restored trial through ``on_trial_add``; :class:`ResumableASHA` then replays the results
Tune saved for that trial (its ``result.json``) into the trial's bracket, which rebuilds the
rungs exactly as they were when the results were reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # ray.air.constants.EXPR_RESULT_FILE, written by Tune's JSON logger


def saved_results(trial: Any) -> list[dict[str, Any]]:
    """The results Tune saved for ``trial`` in its experiment folder (empty for a new trial)."""
    try:
        fs = trial.storage.storage_filesystem
        path = Path(trial.path, RESULT_FILE).as_posix()
    except (AttributeError, RuntimeError, TypeError):  # no trial folder yet
        return []
    try:
        with fs.open_input_stream(path) as f:
            text = f.readall().decode("utf-8")
    except (FileNotFoundError, OSError):
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed driver
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


class ResumableASHA(AsyncHyperBandScheduler):
    """``ASHAScheduler`` whose rungs are rebuilt from saved results when a sweep resumes."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        replayed = 0
        for result in saved_results(trial):
            t, value = result.get(self._time_attr), result.get(self._metric)
            if isinstance(t, (int, float)) and isinstance(value, (int, float)):
                bracket.on_result(trial, t, self._metric_op * value)
                replayed += 1
        if replayed:
            logger.info("ASHA: replayed %d saved results of trial %s", replayed, trial.trial_id)


__all__ = ["ResumableASHA", "saved_results"]
