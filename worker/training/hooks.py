"""What the caller of :func:`~worker.training.trainer.train_adapter` learns during training, and
how it stops it: the :class:`Hooks` it passes and the typed events those hooks receive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StopTraining(Exception):
    """Raised from a callback to abandon training without saving (the lease is lost)."""


@dataclass(frozen=True)
class StartInfo:
    """Training is set up and about to run its first (or first resumed) step."""

    trainable_parameters: int
    total_parameters: int
    examples: int  # training examples kept after preprocessing
    dropped_too_long: int  # training examples longer than ``max_length``
    validation_examples: int | None  # None when the job has no validation file
    total_steps: int
    start_step: int  # the resumed checkpoint's step, 0 for a fresh start


@dataclass(frozen=True)
class Progress:
    """Where training stands after a logged step."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    tokens_per_second: float | None  # None until a step was timed
    eta_seconds: float | None
    trained_tokens: int


@dataclass(frozen=True)
class TrainMetrics:
    """The training loss of a step, logged every ``logging_steps`` and at the last step."""

    step: int
    train_loss: float
    learning_rate: float | None
    epoch: float


@dataclass(frozen=True)
class ValidationMetrics:
    """The loss on the validation set, evaluated at each checkpoint."""

    step: int
    valid_loss: float


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint, written at ``path``."""

    step: int
    path: Path
    train_loss: float | None  # the last logged training loss; None before the first log
    valid_loss: float | None  # None when the job has no validation set

    def metrics(self) -> dict[str, Any]:
        """The metrics stored with the checkpoint: ``valid_loss`` only where one was measured."""
        metrics: dict[str, Any] = {"step": self.step, "train_loss": self.train_loss}
        if self.valid_loss is not None:
            metrics["valid_loss"] = self.valid_loss
        return metrics


class Hooks:
    """What the caller learns during training, and how it stops it. The base class does
    nothing; the job runner subclasses it to write to the database."""

    def on_start(self, info: StartInfo) -> None:
        """Training is set up: parameter counts, data set sizes, total steps, start step."""

    def on_progress(self, progress: Progress) -> None:
        """Step, loss, epoch, tokens/s and ETA, at most every half second."""

    def on_metrics(self, metrics: TrainMetrics | ValidationMetrics) -> None:
        """Logged training metrics (every ``logging_steps``) and validation loss."""

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """A complete checkpoint was written at ``checkpoint.path``."""

    def should_stop(self) -> str | None:
        """None to go on; "cancel" or "preempt" (saves first) to stop; "lost" to abandon."""
        return None
