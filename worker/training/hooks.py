"""What the caller of :func:`~worker.training.trainer.train_adapter` learns during training, and
how it stops it: the :class:`Hooks` it passes and the typed events those hooks receive."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    """The training loss of a step, logged every ``logging_steps`` and at the last step.

    ``train_mean_token_accuracy`` is the share of the step's target tokens (those with a loss)
    that the model's most likely next token got right, taken from the logits of the loss."""

    step: int
    train_loss: float
    learning_rate: float | None
    epoch: float
    train_mean_token_accuracy: float | None = None
    # What the method logs beyond the loss, by its Trainer's names (DPO: ``rewards/margins``…).
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationMetrics:
    """Loss and token accuracy on the whole validation set, evaluated at each checkpoint."""

    step: int
    valid_loss: float
    valid_mean_token_accuracy: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # ``valid_<name>`` (DPO's rewards…)


@dataclass(frozen=True)
class FullValidationMetrics:
    """The whole validation set at the end of training: the evaluation of the last step."""

    step: int
    full_valid_loss: float
    full_valid_mean_token_accuracy: float | None
    extra: dict[str, float] = field(default_factory=dict)  # ``full_valid_<name>``


@dataclass(frozen=True)
class EarlyStop:
    """Training stopped at ``step``: ``patience`` evaluations in a row did not lower the best
    ``valid_loss`` by more than ``threshold``. The adapter delivered is ``best_step``'s."""

    step: int
    best_step: int
    best_valid_loss: float
    patience: int
    threshold: float


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint, written at ``path``."""

    step: int
    path: Path
    train_loss: float | None  # the last logged training loss; None before the first log
    valid_loss: float | None  # None when the job has no validation set
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    # Only on the checkpoint of the step where training ended, when it was evaluated there.
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    # The best evaluated checkpoint so far when early stopping is on: retention must keep it.
    best_path: Path | None = None
    # The method's own metrics last logged (training's by name, the evaluation's valid_<name>).
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The metrics stored with the checkpoint, by OpenAI's names: ``step`` and
        ``train_loss`` always, every other one only where it was measured."""
        metrics: dict[str, Any] = {"step": self.step, "train_loss": self.train_loss}
        for name in ("train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                     "full_valid_loss", "full_valid_mean_token_accuracy"):
            value = getattr(self, name)
            if value is not None:
                metrics[name] = value
        return {**metrics, **self.extra}


Metrics = TrainMetrics | ValidationMetrics | FullValidationMetrics


def metrics_data(metrics: Metrics) -> dict[str, Any]:
    """``metrics`` as one flat record (a metrics event's ``data``): its fields, then the
    method's own metrics beside them."""
    data = asdict(metrics)
    return {**data, **data.pop("extra")}


class Hooks:
    """What the caller learns during training, and how it stops it. The base class does
    nothing; the job runner subclasses it to write to the database."""

    def on_start(self, info: StartInfo) -> None:
        """Training is set up: parameter counts, data set sizes, total steps, start step."""

    def on_progress(self, progress: Progress) -> None:
        """Step, loss, epoch, tokens/s and ETA, at most every half second."""

    def on_metrics(self, metrics: Metrics) -> None:
        """Logged training metrics (every ``logging_steps``), validation loss and accuracy at
        each evaluation, and the full validation at the end."""

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """A complete checkpoint was written at ``checkpoint.path``."""

    def on_early_stop(self, stop: EarlyStop) -> None:
        """Early stopping ended training (the job still succeeds, with the best adapter)."""

    def local_checkpoint(self, path: Path) -> Path:
        """A complete checkpoint that training reads (the best one, at the end), on this
        node's disk: ``path`` itself, or the same step fetched from storage where an earlier
        attempt on another node saved it."""
        return path

    def should_stop(self) -> str | None:
        """None to go on; "cancel" to stop; "preempt" or "pause" to save, then stop; "lost" to
        abandon without saving."""
        return None
