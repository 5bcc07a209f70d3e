"""Early stopping on the validation loss, counted in evaluations.

The rule is transformers' ``EarlyStoppingCallback``'s: an evaluation *improves* when it lowers
the best ``valid_loss`` so far by more than ``threshold``; after ``patience`` evaluations in a
row that do not, training stops. The best checkpoint is the one with the lowest ``valid_loss``
(an improvement smaller than the threshold still makes a new best; a tie does not), and its
adapter is the one the job delivers.

The state is rebuilt from the evaluations in the Trainer's ``log_history``, which every
checkpoint carries: a job that resumes (after a pause, a preemption, a lost worker) counts on
exactly where it stopped counting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Whether to stop, given the evaluations so far; which step was best."""

    patience: int
    threshold: float = 0.0
    best_step: int | None = None
    best_loss: float | None = None
    waited: int = 0  # evaluations in a row without an improvement
    stopped_at: int | None = None  # the step whose evaluation used up the patience

    def observe(self, step: int, valid_loss: float) -> bool:
        """Take the evaluation of ``step``; True when training should stop after it."""
        if self.stopped_at is not None:
            return True
        if self.best_loss is None or self.best_loss - valid_loss > self.threshold:
            self.waited = 0
        else:
            self.waited += 1
        if self.best_loss is None or valid_loss < self.best_loss:
            self.best_step, self.best_loss = step, valid_loss
        if self.waited >= self.patience:
            self.stopped_at = step
        return self.stopped_at is not None

    def replay(self, log_history: Iterable[Mapping[str, Any]]) -> None:
        """Start over from the evaluations (``eval_loss`` entries) of a Trainer's log."""
        self.best_step = self.best_loss = self.stopped_at = None
        self.waited = 0
        for entry in log_history:
            if "eval_loss" in entry and "step" in entry:
                self.observe(int(entry["step"]), float(entry["eval_loss"]))
