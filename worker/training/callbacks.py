"""The transformers callback that turns the Trainer's events into :class:`Hooks` calls."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from shared.schemas import TrainingSpec
from worker.checkpoints import complete_checkpoint
from worker.training.early_stopping import EarlyStopping
from worker.training.hooks import (
    CheckpointInfo,
    Hooks,
    Progress,
    StopTraining,
    TrainMetrics,
    ValidationMetrics,
)

# Between two logging steps, progress is reported at most this often (seconds).
PROGRESS_INTERVAL = 0.5


class JobCallback(TrainerCallback):
    """Reports progress, metrics and checkpoints to ``hooks``, and stops training when they
    say so: a cancel stops, a preemption or a pause saves then stops, a lost lease raises.
    With ``early_stopping``, it also stops once the validation loss stops improving."""

    def __init__(self, hooks: Hooks, spec: TrainingSpec, start_step: int,
                 early_stopping: EarlyStopping | None = None,
                 metric_names: tuple[str, ...] = ()):
        self.hooks = hooks
        self.spec = spec
        self.early_stopping = early_stopping
        # The method's own metrics (TrainingMethod.metric_names), passed on beside the loss.
        self.metric_names = metric_names
        self.train_extra: dict[str, float] = {}
        self.valid_extra: dict[str, float] = {}
        self.stop_reason: str | None = None
        self.t0 = time.monotonic()
        self.start_step = start_step
        self.tokens0: int | None = None
        self.step0 = start_step
        self.valid_loss: float | None = None
        self.valid_accuracy: float | None = None
        self.valid_step: int | None = None
        self.train_accuracy: float | None = None
        self.last_progress = 0.0
        self.loss_history: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if self.early_stopping is not None:
            # The evaluations of the earlier attempts, restored from the checkpoint.
            self.early_stopping.replay(state.log_history)
        return control

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        reason = self.hooks.should_stop()
        if reason == "lost":
            raise StopTraining("lease lost")
        if reason in ("cancel", "preempt", "pause") and self.stop_reason is None:
            self.stop_reason = reason
            control.should_training_stop = True
            # A preempted or paused job continues later from this checkpoint.
            control.should_save = reason in ("preempt", "pause")
        return control

    def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self.loss_history.append((step, float(logs["loss"])))
            self.train_accuracy = logs.get("mean_token_accuracy")
            self.train_extra = {n: float(logs[n]) for n in self.metric_names if n in logs}
        if self.tokens0 is None:
            # Throughput is measured from the first logged step on: it leaves out model
            # loading, the first (slow) step and, when resuming, the earlier attempts' tokens.
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = time.monotonic()
            self.step0 = step
        if "loss" not in logs:
            return
        elapsed = time.monotonic() - self.t0
        done = step - self.step0  # the steps timed by ``elapsed``
        tps = (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else None
        eta = (state.max_steps - step) * elapsed / done if done > 0 and elapsed > 0 else None
        progress = Progress(
            step=step,
            total_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 4),
            loss=logs["loss"],
            tokens_per_second=round(tps, 1) if tps else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            trained_tokens=state.num_input_tokens_seen,
        )
        now = time.monotonic()
        if step % self.spec.logging_steps == 0 or step == state.max_steps:
            self.hooks.on_metrics(TrainMetrics(
                step=step, train_loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                epoch=progress.epoch,
                train_mean_token_accuracy=logs.get("mean_token_accuracy"),
                extra=self.train_extra))
            self.hooks.on_progress(progress)
            self.last_progress = now
        elif now - self.last_progress > PROGRESS_INTERVAL:
            self.hooks.on_progress(progress)
            self.last_progress = now

    def on_evaluate(self, args, state, control, metrics=None, **kw):  # type: ignore[no-untyped-def]
        if not metrics or "eval_loss" not in metrics:
            return control
        step = state.global_step
        self.valid_loss = float(metrics["eval_loss"])
        self.valid_accuracy = metrics.get("eval_mean_token_accuracy")
        self.valid_step = step
        self.valid_extra = {f"valid_{n}": float(metrics[f"eval_{n}"]) for n in self.metric_names
                            if f"eval_{n}" in metrics}
        self.hooks.on_metrics(ValidationMetrics(step=step, valid_loss=self.valid_loss,
                                                valid_mean_token_accuracy=self.valid_accuracy,
                                                extra=self.valid_extra))
        if self.early_stopping is not None and self.early_stopping.observe(step,
                                                                           self.valid_loss):
            # The checkpoint of this step is still written (evaluations fall on save steps).
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        step = state.global_step
        path = Path(args.output_dir) / f"checkpoint-{step}"
        if not complete_checkpoint(path):
            return
        train_loss = self.loss_history[-1][1] if self.loss_history else None
        early = self.early_stopping
        # Training ends at this step: its evaluation is the full validation of the job's end.
        ending = step >= state.max_steps or (early is not None and early.stopped_at == step)
        full = ending and self.valid_step == step
        best = (Path(args.output_dir) / f"checkpoint-{early.best_step}"
                if early is not None and early.best_step is not None else None)
        self.hooks.on_checkpoint(CheckpointInfo(
            step=step, path=path, train_loss=train_loss, valid_loss=self.valid_loss,
            train_mean_token_accuracy=self.train_accuracy,
            valid_mean_token_accuracy=self.valid_accuracy,
            full_valid_loss=self.valid_loss if full else None,
            full_valid_mean_token_accuracy=self.valid_accuracy if full else None,
            best_path=best, extra={**self.train_extra, **self.valid_extra}))
