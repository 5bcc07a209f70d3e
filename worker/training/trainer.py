"""One job's training run, ``setup → train → save``, around transformers' Trainer."""

from __future__ import annotations

import json
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
from transformers import Trainer, TrainingArguments, set_seed

from shared.schemas import TrainingSpec
from worker.checkpoints import write_marker
from worker.collate import make_collator
from worker.last_layer import is_patched as last_layer_patched
from worker.preprocess import Prepared
from worker.training.adapter_io import save_adapter
from worker.training.callbacks import JobCallback
from worker.training.hooks import Hooks, StartInfo, StopTraining
from worker.training.model import load_model, pick_device


@dataclass
class Result:
    """How :func:`train_adapter` ended: with an adapter, or stopped at ``step``."""

    adapter_dir: Path | None
    stopped: str | None  # None: finished; "cancel" or "preempt"
    step: int
    trained_tokens: int
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the training loop (checkpoint saves included)


class AtomicTrainer(Trainer):
    """Writes each checkpoint in a staging folder and renames it into place when complete.

    transformers writes ``checkpoint-N`` in place, so a kill mid-save leaves a folder that looks
    like a checkpoint (transformers#35782). Here ``checkpoint-N`` only ever exists complete.
    """

    _staging: str | None = None
    # Raises StopTraining once this worker's lease is gone: checked before a checkpoint is
    # moved into place, so a worker that was frozen or cut off never overwrites the new owner's.
    fence: Callable[[], None] | None = None

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
    return TrainingArguments(
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
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        start_step = int(state["global_step"])
    args = training_arguments(spec, checkpoints_dir, device, data.validation is not None)
    callback = JobCallback(hooks, spec, start_step)
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
    steps_per_epoch = math.ceil(
        len(data.train) / (spec.batch_size * spec.gradient_accumulation_steps))
    total_steps = spec.max_steps or math.ceil(steps_per_epoch * spec.n_epochs)
    hooks.on_start(StartInfo(
        trainable_parameters=trainable, total_parameters=total, examples=data.examples,
        dropped_too_long=data.dropped_too_long, validation_examples=data.validation_examples,
        total_steps=total_steps, start_step=start_step))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - t0
    step = trainer.state.global_step
    tokens = int(trainer.state.num_input_tokens_seen)
    if callback.stop_reason is not None:
        return Result(None, callback.stop_reason, step, tokens, callback.loss_history, seconds)
    fence()  # the adapter folder is shared: only the lease holder may replace it
    adapter = save_adapter(model, spec, adapter_dest, {
        **(adapter_meta or {}), "steps": step, "trained_tokens": tokens})
    return Result(adapter, None, step, tokens, callback.loss_history, seconds)
