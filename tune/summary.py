"""The sweep's summary table: every trial, its settings, score and fate, best first.

Pure functions over plain records (no Ray, no MLflow), so the table and the choice of the
best trial are tested on their own. A trial's score is its best validation Dice over the
epochs it reported (the epoch whose checkpoint the model registry receives).

Statuses:
    completed       ran all ``train.epochs``
    early_stopped   stopped by ASHA before the last epoch
    failed          raised (bad settings, a crash, Train's retries used up)
    unfinished      pending or running when the sweep stopped (``--resume`` continues it)
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ossnet_tune.space import PARAMETERS, format_setting, trial_settings

STATUSES: tuple[str, ...] = ("completed", "early_stopped", "failed", "unfinished")
SCORED_STATUSES: tuple[str, ...] = ("completed", "early_stopped")


@dataclass(frozen=True)
class TrialSummary:
    """One trial of a sweep.

    Attributes:
        trial_id: Tune's trial id.
        run_name: the trial's Ray Train run name = MLflow run key.
        status: one of :data:`STATUSES`.
        settings: effective sampled settings (``alpha`` is 0 when the auxiliary loss is off).
        epochs: the last epoch it reported (0 if none).
        best_val_dice: best validation Dice over its epochs (None if it reported none).
        best_epoch: the epoch of ``best_val_dice``.
        last_val_dice: validation Dice of its last epoch.
        checkpoint_path: Ray Train checkpoint of the best epoch, when one was reported.
        error: first line of the error of a failed trial.
        mlflow_run_id: its MLflow child run, when found.
    """

    trial_id: str
    run_name: str
    status: str
    settings: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0
    best_val_dice: float | None = None
    best_epoch: int | None = None
    last_val_dice: float | None = None
    checkpoint_path: str | None = None
    error: str | None = None
    mlflow_run_id: str | None = None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None  # pandas fills gaps with NaN


def summarize_trial(
    trial_id: str,
    run_name: str,
    tune_status: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    error: str | None,
    max_t: int,
    metric: str = "val_dice",
) -> TrialSummary:
    """Summarise one trial from its Tune status, config and reported rows.

    Args:
        trial_id, run_name: identifiers.
        tune_status: Tune's status ("TERMINATED", "ERROR", "PENDING", "RUNNING", "PAUSED").
        config: the sampled settings.
        rows: its reported results in order (keys ``epoch``, ``metric``, ``checkpoint_path``).
        error: the error text of a failed trial (first line kept).
        max_t: epochs of a complete trial.
        metric: the score reported per epoch.
    """
    epochs = max((int(_number(r.get("epoch")) or 0) for r in rows), default=0)
    scored = [(s, int(_number(r.get("epoch")) or 0), r) for r in rows if (s := _number(r.get(metric))) is not None]
    best = max(scored, key=lambda item: (item[0], item[1]), default=None)
    last = scored[-1][0] if scored else None
    if tune_status == "ERROR":
        status = "failed"
    elif tune_status == "TERMINATED":
        status = "completed" if epochs >= max_t else "early_stopped"
    else:
        status = "unfinished"
    message = None
    if error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        message = lines[-1] if lines else None  # a traceback ends with the exception line
    return TrialSummary(
        trial_id=trial_id, run_name=run_name, status=status, settings=trial_settings(config), epochs=epochs,
        best_val_dice=best[0] if best else None, best_epoch=best[1] if best else None, last_val_dice=last,
        checkpoint_path=_text(best[2].get("checkpoint_path")) if best else None,
        error=message,
    )


def rank_trials(trials: Iterable[TrialSummary]) -> tuple[TrialSummary, ...]:
    """Best first: scored trials by score (ties: more epochs, then id), then unscored, failed last."""

    def key(t: TrialSummary) -> tuple[int, float, int, str]:
        group = 2 if t.status == "failed" else (0 if t.best_val_dice is not None else 1)
        return group, -(t.best_val_dice or 0.0), -t.epochs, t.trial_id

    return tuple(sorted(trials, key=key))


def best_trial(trials: Iterable[TrialSummary]) -> TrialSummary | None:
    """The best completed or early-stopped trial with a score (failed trials never win)."""
    for t in rank_trials(trials):
        if t.status in SCORED_STATUSES and t.best_val_dice is not None:
            return t
    return None


def table_rows(trials: Iterable[TrialSummary], parameters: Sequence[str] = PARAMETERS) -> list[dict[str, str]]:
    """The summary as rows of text, ranked, one column per searched parameter."""
    rows = []
    for rank, t in enumerate(rank_trials(trials), start=1):
        row = {"rank": str(rank), "trial": t.trial_id, "status": t.status,
               "val_dice": format_setting("val_dice", t.best_val_dice), "best_epoch": format_setting("", t.best_epoch),
               "epochs": str(t.epochs)}
        row.update({p: format_setting(p, t.settings.get(p)) for p in parameters})
        row["mlflow_run_id"] = t.mlflow_run_id or ""
        row["error"] = (t.error or "")[:160]
        rows.append(row)
    return rows


def to_csv(trials: Iterable[TrialSummary], parameters: Sequence[str] = PARAMETERS) -> str:
    """The summary table as CSV (header + one line per trial)."""
    rows = table_rows(trials, parameters)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def to_markdown(trials: Iterable[TrialSummary], parameters: Sequence[str] = PARAMETERS) -> str:
    """The summary table as a Markdown table (without the MLflow id and error columns when empty)."""
    rows = table_rows(trials, parameters)
    if not rows:
        return "(no trials)\n"
    columns = [c for c in rows[0] if c not in ("mlflow_run_id", "error") or any(r[c] for r in rows)]
    widths = {c: max(len(c), *(len(r[c].replace("|", "/")) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[c].replace("|", "/").ljust(widths[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def status_counts(trials: Iterable[TrialSummary]) -> dict[str, int]:
    """Trials per status (every status present, zeros included)."""
    counts = {s: 0 for s in STATUSES}
    for t in trials:
        counts[t.status] += 1
    return counts


__all__ = [
    "SCORED_STATUSES",
    "STATUSES",
    "TrialSummary",
    "best_trial",
    "rank_trials",
    "status_counts",
    "summarize_trial",
    "table_rows",
    "to_csv",
    "to_markdown",
]
