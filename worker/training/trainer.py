"""One job's training run, ``setup → train → save``, around the Trainer of the job's method
(:mod:`~worker.training.method`): resume, hooks, early stopping, the best checkpoint, the parity
probe and the adapter's save are the same whatever the method."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import set_seed

from shared.schemas import TrainingSpec
from worker.preprocess import Prepared
from worker.training import supervised
from worker.training.adapter_io import save_adapter
from worker.training.callbacks import JobCallback
from worker.training.early_stopping import EarlyStopping
from worker.training.hooks import EarlyStop, FullValidationMetrics, Hooks, StartInfo, StopTraining
from worker.training.method import TrainingMethod
from worker.training.model import pick_device
from worker.training.probe import parity_probe
from worker.training.results import StepMetrics, last_evaluation, step_metrics

log = logging.getLogger(__name__)


def _dpo() -> TrainingMethod:
    # Imported on first use: TRL (and the W&B client it imports) loads only on a worker that
    # runs a DPO job.
    from worker.training import dpo

    return dpo.METHOD


# Method name (TrainingSpec.method, OpenAI's method.type) → how it trains.
METHODS: dict[str, Callable[[], TrainingMethod]] = {"supervised": lambda: supervised.METHOD,
                                                    "dpo": _dpo}


@dataclass
class Result:
    """How :func:`train_adapter` ended: with an adapter, or stopped at ``step``."""

    adapter_dir: Path | None
    stopped: str | None  # None: finished; "cancel", "preempt" or "pause"
    step: int
    trained_tokens: int
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the training loop (checkpoint saves included)
    # Every step's metrics, earlier attempts' included (finished runs only).
    metrics: list[StepMetrics] = field(default_factory=list)
    # With early stopping: the checkpoint whose adapter was delivered (keep it), and whether
    # (and where) the validation loss stopped training before its last step.
    best_checkpoint: Path | None = None
    early_stop: EarlyStop | None = None


def method_for(spec: TrainingSpec) -> TrainingMethod:
    """The training method of the job (its ``method``)."""
    try:
        method = METHODS[spec.method]
    except KeyError:
        raise ValueError(f"no training method '{spec.method}' on this worker") from None
    return method()


def train_adapter(
    spec: TrainingSpec,
    tokenizer: Any,
    data: Prepared,
    checkpoints_dir: Path,
    adapter_dest: Path,
    *,
    resume_from: Path | None = None,
    device: str = "auto",
    hooks: Hooks | None = None,
    adapter_meta: dict[str, Any] | None = None,
) -> Result:
    """Train (or resume) one LoRA adapter.

    Args:
        resume_from: a *complete* checkpoint folder; optimizer, scheduler, RNG and data position
            are restored from it.

    Raises:
        ModelLoadError: the base model or LoRA targets do not load.
        StopTraining: ``hooks.should_stop`` said the lease is lost.
    """
    hooks = hooks or Hooks()
    method = method_for(spec)
    device = pick_device(device)
    set_seed(spec.seed)
    start_step = 0
    resumed_state: dict[str, Any] = {}
    if resume_from is not None:
        resumed_state = json.loads((resume_from / "trainer_state.json").read_text())
        start_step = int(resumed_state["global_step"])
    early = (EarlyStopping(spec.early_stopping_patience, spec.early_stopping_threshold)
             if spec.early_stopping_patience and data.validation is not None else None)
    callback = JobCallback(hooks, spec, start_step, early, method.metric_names)
    setup = method.setup(spec, tokenizer, data, checkpoints_dir, device, callback)
    trainer, model, trainable, total = setup.trainer, setup.model, setup.trainable, setup.total

    def fence() -> None:
        if hooks.should_stop() == "lost":
            raise StopTraining("lease lost")

    trainer.fence = fence  # type: ignore[attr-defined]  # AtomicCheckpoints
    steps_per_epoch = math.ceil(setup.batches_per_epoch / spec.gradient_accumulation_steps)
    total_steps = spec.max_steps or math.ceil(steps_per_epoch * spec.n_epochs)
    hooks.on_start(StartInfo(
        trainable_parameters=trainable, total_parameters=total, examples=data.examples,
        dropped_too_long=data.dropped_too_long, validation_examples=data.validation_examples,
        total_steps=total_steps, start_step=start_step))
    t0 = time.perf_counter()
    if early is not None and resume_from is not None:
        early.replay(resumed_state.get("log_history", []))
    trained = not (early is not None and early.stopped_at is not None)
    if not trained:
        # An earlier attempt stopped early at this checkpoint and died before it finished:
        # training is over, only the end below is left to do.
        log.info("early stopping had ended training at step %d; finishing", start_step)
        step, tokens = start_step, int(resumed_state.get("num_input_tokens_seen", 0))
        history = resumed_state.get("log_history", [])
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        step = trainer.state.global_step
        tokens = int(trainer.state.num_input_tokens_seen)
        history = trainer.state.log_history
    seconds = time.perf_counter() - t0
    stopped = callback.stop_reason
    if stopped in ("pause", "preempt") and early is not None and early.stopped_at == step:
        stopped = None  # the same step ended training anyway: finish rather than come back
    if stopped is not None:
        return Result(None, stopped, step, tokens, callback.loss_history, seconds)
    metrics = step_metrics(history, method.metric_names)
    result = Result(None, None, step, tokens, callback.loss_history, seconds, metrics)
    final = last_evaluation(metrics)
    if final is not None and final.step == step and final.valid_loss is not None:
        hooks.on_metrics(FullValidationMetrics(
            step=step, full_valid_loss=final.valid_loss,
            full_valid_mean_token_accuracy=final.valid_mean_token_accuracy,
            extra={f"full_{k}": v for k, v in final.extra.items() if k.startswith("valid_")}))
    extra: dict[str, Any] = {}
    if early is not None and early.best_step is not None and early.best_loss is not None:
        # The job delivers the best evaluated checkpoint, whether or not it stopped early.
        result.best_checkpoint = checkpoints_dir / f"checkpoint-{early.best_step}"
        if early.best_step != step or not trained:
            _load_adapter_weights(model, hooks.local_checkpoint(result.best_checkpoint))
        extra["best_step"] = early.best_step
        if early.stopped_at is not None:
            result.early_stop = EarlyStop(step=step, best_step=early.best_step,
                                          best_valid_loss=early.best_loss,
                                          patience=early.patience, threshold=early.threshold)
            hooks.on_early_stop(result.early_stop)
    # Before the fence: the check of the lease stays right before the adapter is replaced.
    probe = parity_probe(model, tokenizer, spec)
    fence()  # the adapter folder is shared: only the lease holder may replace it
    if data.tool_format is not None:  # inference renders tools as training did
        extra["tool_format"] = data.tool_format
    result.adapter_dir = save_adapter(model, spec, adapter_dest, {
        **(adapter_meta or {}), "steps": step, "trained_tokens": tokens, **extra,
        **({"parity_probe": probe} if probe is not None else {})})
    return result


def _load_adapter_weights(model: Any, checkpoint: Path) -> None:
    """Put the LoRA weights of ``checkpoint`` (a complete checkpoint of this run) into
    ``model``, exactly as saved.

    Raises:
        RuntimeError: the checkpoint is gone or lacks an adapter weight of the model.
    """
    path = checkpoint / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"the best checkpoint {checkpoint} is gone; cannot deliver it")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    loaded: Any = set_peft_model_state_dict(model, load_file(str(path), device=str(device)))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"the best checkpoint {checkpoint} lacks {missing[:3]}")
