"""One job's training run, ``setup → train → save``, around transformers' Trainer."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, set_seed

from shared.schemas import TrainingSpec
from worker.checkpoints import write_marker
from worker.collate import make_collator
from worker.last_layer import is_patched as last_layer_patched
from worker.preprocess import Prepared
from worker.token_batches import TokenBudgetBatchSampler, token_budget
from worker.training.accuracy import TokenAccuracy
from worker.training.adapter_io import save_adapter
from worker.training.callbacks import JobCallback
from worker.training.early_stopping import EarlyStopping
from worker.training.hooks import EarlyStop, FullValidationMetrics, Hooks, StartInfo, StopTraining
from worker.training.model import load_model, pick_device
from worker.training.probe import parity_probe
from worker.training.results import StepMetrics, last_evaluation, step_metrics

log = logging.getLogger(__name__)


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


class AtomicTrainer(Trainer):
    """Writes each checkpoint in a staging folder and renames it into place when complete.

    transformers writes ``checkpoint-N`` in place, so a kill mid-save leaves a folder that looks
    like a checkpoint (transformers#35782). Here ``checkpoint-N`` only ever exists complete.

    It also logs the token accuracy of training steps (``mean_token_accuracy``) and evaluations
    (``eval_mean_token_accuracy``), counted from the logits each loss was computed from.
    """

    _staging: str | None = None
    # Raises StopTraining once this worker's lease is gone: checked before a checkpoint is
    # moved into place, so a worker that was frozen or cut off never overwrites the new owner's.
    fence: Callable[[], None] | None = None

    # Token-budget batches (worker.token_batches); None: fixed batches of batch_size.
    batch_sampler: TokenBudgetBatchSampler | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._accuracy = {True: TokenAccuracy(), False: TokenAccuracy()}  # by model.training

    def get_train_dataloader(self) -> DataLoader:
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        # The Trainer's resume skips the batches already trained and calls set_epoch on this
        # sampler each epoch: its batches depend on nothing else, so resuming stays exact.
        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler,  # type: ignore[arg-type]
                            collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False,  # type: ignore[no-untyped-def]
                     num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is not None:
            self._accuracy[model.training].add(logits, inputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Added before the Trainer stores the entry: the log history (saved with every
        # checkpoint) then holds the accuracies, and on_evaluate sees the same dict.
        for key, training, name in (("loss", True, "mean_token_accuracy"),
                                    ("eval_loss", False, "eval_mean_token_accuracy")):
            if key in logs:
                accuracy = self._accuracy[training].take()
                if accuracy is not None:
                    logs[name] = accuracy
        super().log(logs, start_time)

    def _track_num_input_tokens(self, inputs):  # type: ignore[no-untyped-def]
        # A packed row has no padding, but counting "not the pad id" would skip every eos of
        # a tokenizer whose pad token is its eos (Phi-2's).
        if "cu_seq_lens_q" in inputs and "attention_mask" not in inputs:
            self.state.num_input_tokens_seen += int(inputs["input_ids"].numel())
            return
        super()._track_num_input_tokens(inputs)

    def _get_output_dir(self, trial):  # type: ignore[no-untyped-def]
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        root = super()._get_output_dir(trial)
        os.makedirs(root, exist_ok=True)
        self._staging = tempfile.mkdtemp(dir=root, prefix=".staging-")
        try:
            super()._save_checkpoint(model, trial)
            name = f"checkpoint-{self.state.global_step}"
            staged = Path(self._staging) / name
            write_marker(staged, self.state.global_step)
            if self.fence is not None:
                self.fence()
            final = Path(root) / name
            if final.exists():  # the same step saved by an earlier attempt
                trash = Path(root) / f".trash-{name}-{time.time_ns()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staged, final)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def training_arguments(spec: TrainingSpec, output_dir: Path, device: str,
                       has_eval: bool) -> TrainingArguments:
    """The job's spec as transformers' ``TrainingArguments``, checkpointing into ``output_dir``."""
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    fp16 = device.startswith("cuda") and not bf16
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup,
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.n_epochs,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=None,  # retention is ours: it knows which checkpoints are complete
        eval_strategy="steps" if has_eval else "no",
        eval_steps=spec.save_steps if has_eval else None,
        # Evaluation needs the loss only (accuracy is counted from the logits as they pass):
        # without this the Trainer keeps every batch's logits until the end of the evaluation.
        prediction_loss_only=True,
        seed=spec.seed,
        data_seed=spec.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=fp16,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ignore_data_skip=False,
        **_checkpointing(spec.gradient_checkpointing),
    )
    if args.n_gpu > 1:
        # One job, one GPU. transformers counts every visible GPU and wraps the model in
        # nn.DataParallel when it sees several, which splits a packed row's tokens from its
        # sample boundaries. A pinned worker (worker.devices) sees one; this is the guard for a
        # process that was not pinned. The Trainer sets the same field for model parallelism.
        log.warning("%d GPUs visible to one worker process; training on %s only (set "
                    "LORAFLEET_DEVICE=cuda:N or use `lorafleet worker --gpus`)", args.n_gpu,
                    args.device)
        args._n_gpu = 1
    return args


def _checkpointing(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for activation (gradient) checkpointing, by the name this version of
    transformers uses (``activation_checkpointing`` in recent releases, else the old name)."""
    if not enabled:
        return {}
    # Non-reentrant: works with a frozen base whose inputs need no gradient (LoRA).
    kwargs = {"use_reentrant": False}
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": True, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}


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
    device = pick_device(device)
    set_seed(spec.seed)
    model, trainable, total = load_model(spec, device)
    start_step = 0
    resumed_state: dict[str, Any] = {}
    if resume_from is not None:
        resumed_state = json.loads((resume_from / "trainer_state.json").read_text())
        start_step = int(resumed_state["global_step"])
    early = (EarlyStopping(spec.early_stopping_patience, spec.early_stopping_threshold)
             if spec.early_stopping_patience and data.validation is not None else None)
    args = training_arguments(spec, checkpoints_dir, device, data.validation is not None)
    callback = JobCallback(hooks, spec, start_step, early)
    trainer = AtomicTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=make_collator(tokenizer, packing=spec.packing,
                                    last_layer=last_layer_patched(model)),
        processing_class=tokenizer,
        callbacks=[callback],
    )

    def fence() -> None:
        if hooks.should_stop() == "lost":
            raise StopTraining("lease lost")

    trainer.fence = fence
    budget = (token_budget(spec.max_tokens_per_batch, device, spec.max_length)
              if spec.packing else None)
    batches_per_epoch = math.ceil(len(data.train) / spec.batch_size)
    if budget is not None:
        lengths = [len(ids) for ids in data.train["input_ids"]]
        trainer.batch_sampler = TokenBudgetBatchSampler(lengths, budget, spec.seed)
        batches_per_epoch = len(trainer.batch_sampler)
        log.info("batches of at most %d tokens: %d per epoch (%d examples)", budget,
                 batches_per_epoch, len(lengths))
    steps_per_epoch = math.ceil(batches_per_epoch / spec.gradient_accumulation_steps)
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
    metrics = step_metrics(history)
    result = Result(None, None, step, tokens, callback.loss_history, seconds, metrics)
    final = last_evaluation(metrics)
    if final is not None and final.step == step and final.valid_loss is not None:
        hooks.on_metrics(FullValidationMetrics(
            step=step, full_valid_loss=final.valid_loss,
            full_valid_mean_token_accuracy=final.valid_mean_token_accuracy))
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
