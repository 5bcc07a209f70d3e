"""A job's per-step metrics, read from the Trainer's ``log_history``, and the results file.

The log history travels with every checkpoint (``trainer_state.json``), so the metrics of a
job that was paused, preempted or resumed by another worker are all there at the end, once per
step. The file has the columns of OpenAI's ``step_metrics.csv`` (a ``fine-tune-results``
file): ``step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy``, a value left
empty where it was not measured (validation runs at checkpoints only), then a column for each
metric of the job's method (a DPO job's ``rewards/margins``…, then ``valid_rewards/margins``…).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESULTS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss",
                   "valid_mean_token_accuracy")


@dataclass
class StepMetrics:
    """What was measured at one step (``None``: not measured there)."""

    step: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    # The method's own metrics: ``name`` from training, ``valid_<name>`` from an evaluation.
    extra: dict[str, float] = field(default_factory=dict)


def results_columns(metric_names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The results file's columns for a method whose Trainer logs ``metric_names``."""
    return (*RESULTS_COLUMNS, *metric_names, *(f"valid_{n}" for n in metric_names))


def step_metrics(log_history: Iterable[Mapping[str, Any]],
                 metric_names: tuple[str, ...] = ()) -> list[StepMetrics]:
    """The training (``loss``, ``mean_token_accuracy``, ``metric_names``) and evaluation
    (``eval_loss``, ``eval_mean_token_accuracy``, ``eval_<name>``) entries of a Trainer's log,
    one row per step, by step. A step logged twice (an attempt that redid it) keeps its last
    values."""
    rows: dict[int, StepMetrics] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        step = int(entry["step"])
        if "loss" in entry:
            row = rows.setdefault(step, StepMetrics(step))
            row.train_loss = float(entry["loss"])
            row.train_accuracy = _number(entry.get("mean_token_accuracy"))
            row.extra.update({n: float(entry[n]) for n in metric_names if n in entry})
        if "eval_loss" in entry:
            row = rows.setdefault(step, StepMetrics(step))
            row.valid_loss = float(entry["eval_loss"])
            row.valid_mean_token_accuracy = _number(entry.get("eval_mean_token_accuracy"))
            row.extra.update({f"valid_{n}": float(entry[f"eval_{n}"]) for n in metric_names
                              if f"eval_{n}" in entry})
    return [rows[step] for step in sorted(rows)]


def last_evaluation(rows: list[StepMetrics]) -> StepMetrics | None:
    """The row of the last step that was evaluated, if any."""
    return next((r for r in reversed(rows) if r.valid_loss is not None), None)


def results_csv(rows: list[StepMetrics], columns: tuple[str, ...] = RESULTS_COLUMNS) -> bytes:
    """``rows`` as the results file: a header (``columns``, see :func:`results_columns`), then
    one line per step."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = (getattr(row, c) if c in RESULTS_COLUMNS else row.extra.get(c) for c in columns)
        writer.writerow(["" if v is None else _format(v) for v in values])
    return out.getvalue().encode()


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _format(value: int | float) -> str:
    # repr keeps every digit of a float, so the file says exactly what the events say.
    return str(value) if isinstance(value, int) else repr(float(value))
