"""The transformers callback that turns the Trainer's events into :class:`Hooks` calls."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from shared.schemas import TrainingSpec
from worker.checkpoints import complete_checkpoint
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
    say so: a cancel stops, a preemption saves then stops, a lost lease raises."""

    def __init__(self, hooks: Hooks, spec: TrainingSpec, start_step: int):
        self.hooks = hooks
        self.spec = spec
        self.stop_reason: str | None = None
        self.t0 = time.monotonic()
        self.start_step = start_step
        self.tokens0: int | None = None
        self.valid_loss: float | None = None
        self.last_progress = 0.0
        self.loss_history: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        reason = self.hooks.should_stop()
        if reason == "lost":
            raise StopTraining("lease lost")
        if reason in ("cancel", "preempt") and self.stop_reason is None:
            self.stop_reason = reason
            control.should_training_stop = True
            control.should_save = reason == "preempt"
        return control

    def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self.loss_history.append((step, float(logs["loss"])))
        if self.tokens0 is None:
            # Throughput is measured from the first logged step on: it leaves out model
            # loading, the first (slow) step and, when resuming, the earlier attempts' tokens.
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = time.monotonic()
        if "loss" not in logs:
            return
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
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
            self.hooks.on_metrics(TrainMetrics(step=step, train_loss=logs["loss"],
                                               learning_rate=logs.get("learning_rate"),
                                               epoch=progress.epoch))
            self.hooks.on_progress(progress)
            self.last_progress = now
        elif now - self.last_progress > PROGRESS_INTERVAL:
            self.hooks.on_progress(progress)
            self.last_progress = now

    def on_evaluate(self, args, state, control, metrics=None, **kw):  # type: ignore[no-untyped-def]
        if metrics and "eval_loss" in metrics:
            self.valid_loss = float(metrics["eval_loss"])
            self.hooks.on_metrics(ValidationMetrics(step=state.global_step,
                                                    valid_loss=self.valid_loss))

    def on_save(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not complete_checkpoint(path):
            return
        train_loss = self.loss_history[-1][1] if self.loss_history else None
        self.hooks.on_checkpoint(CheckpointInfo(step=state.global_step, path=path,
                                                train_loss=train_loss,
                                                valid_loss=self.valid_loss))
