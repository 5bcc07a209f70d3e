"""LoRA training of one job: ``setup → train → save`` around transformers' Trainer.

This module knows nothing of the database or Celery: the job runner passes :class:`Hooks` that
report progress and say when to stop, and benchmarks call :func:`train_adapter` directly.
"""

from __future__ import annotations

import importlib.util
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
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from shared.errors import LorafleetError
from shared.schemas import TrainingSpec
from worker.attention import use_packed_attention
from worker.checkpoints import COMPLETE_MARKER, complete_checkpoint, write_marker
from worker.collate import make_collator
from worker.last_layer import is_patched as last_layer_patched
from worker.last_layer import run_last_layer_on_loss_positions
from worker.preprocess import Prepared

log = logging.getLogger(__name__)

ADAPTER_META = "lorafleet.json"

# Attention and MLP projections per architecture; anything else gets peft's "all-linear".
TARGET_MODULES: dict[str, list[str]] = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


class ModelLoadError(LorafleetError):
    code = "model_load_failed"


class StopTraining(Exception):
    """Raised from a callback to abandon training without saving (the lease is lost)."""


class Hooks:
    """What the caller learns during training, and how it stops it. The base class does
    nothing; the job runner subclasses it to write to the database."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Training is set up: parameter counts, data set sizes, total steps, start step."""

    def on_progress(self, progress: dict[str, Any]) -> None:
        """Step, loss, epoch, tokens/s and ETA, at most every half second."""

    def on_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Logged training metrics (every ``logging_steps``) and validation loss."""

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """A complete checkpoint was written at ``path``."""

    def should_stop(self) -> str | None:
        """None to go on; "cancel" or "preempt" (saves first) to stop; "lost" to abandon."""
        return None


@dataclass
class Result:
    adapter_dir: Path | None
    stopped: str | None  # None: finished; "cancel" or "preempt"
    step: int
    trained_tokens: int
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the training loop (checkpoint saves included)


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_tokenizer(model: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model reference
        raise ModelLoadError(f"could not load the tokenizer of '{model}': {e}",
                             param="model") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(spec: TrainingSpec, device: str) -> Any:
    """``BitsAndBytesConfig`` for ``quantization: "4bit"`` (QLoRA), or None.

    Raises:
        ModelLoadError: this worker can't run a 4-bit base model (no CUDA, no bitsandbytes).
    """
    if spec.quantization is None:
        return None
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ModelLoadError(
            f"quantization '{spec.quantization}' needs a CUDA GPU and this worker trains on "
            f"'{device}'; submit the job without quantization or run a GPU worker",
            param="quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization '{spec.quantization}' needs the bitsandbytes package, which this "
            "worker lacks (pip install 'lorafleet[gpu]'); or submit without quantization",
            param="quantization")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported()
        else torch.float16,
    )


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' ``NewGELUActivation`` (Phi, GPT-2: the tanh approximation of GELU
    written as six elementwise ops) for PyTorch's fused kernel of the same formula: one pass
    instead of six, forward and backward, equal to float rounding. Returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def load_model(spec: TrainingSpec, device: str) -> tuple[PeftModel, int, int]:
    """Base model + fresh LoRA adapter; returns ``(model, trainable, total)`` parameters.

    Raises:
        ModelLoadError: the model does not load, or ``quantization`` can't run here.
    """
    dtype = torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    quantization = _quantization_config(spec, device)
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra = {"quantization_config": quantization,
                 "device_map": {"": torch.cuda.current_device()}}
    try:
        base = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype,
                                                    trust_remote_code=False, **extra)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load model '{spec.model}': {e}", param="model") from e
    # A KV cache is for generation; in training it only keeps copies of every layer's keys and
    # values, and (transformers 5) its presence turns off the per-sample mask of packed rows.
    base.config.use_cache = False
    fuse_tanh_gelu(base)
    if spec.packing and use_packed_attention(base) and not spec.train_on_inputs:
        run_last_layer_on_loss_positions(base)
    if quantization is not None:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] | str = (spec.lora.target_modules
                                or TARGET_MODULES.get(base.config.model_type) or "all-linear")
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # annotated int; any number scales
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as e:
        raise ModelLoadError(f"LoRA: {e}", param="lora.target_modules") from e
    trainable, total = model.get_nb_trainable_parameters()
    # The seed recipe's report, kept for the worker log.
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f",
             trainable, total, 100 * trainable / total)
    return model, trainable, total


class _AtomicTrainer(Trainer):
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


class _JobCallback(TrainerCallback):
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
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = time.monotonic()
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        tps = (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else None
        eta = (state.max_steps - step) * elapsed / done if done > 0 and elapsed > 0 else None
        progress = {
            "step": step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "tokens_per_second": round(tps, 1) if tps else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "trained_tokens": state.num_input_tokens_seen,
        }
        if "loss" not in logs:
            return
        now = time.monotonic()
        if step % self.spec.logging_steps == 0 or step == state.max_steps:
            self.hooks.on_metrics(step, {"train_loss": logs["loss"],
                                         "learning_rate": logs.get("learning_rate"),
                                         "epoch": progress["epoch"]})
            self.hooks.on_progress(progress)
            self.last_progress = now
        elif now - self.last_progress > 0.5:
            self.hooks.on_progress(progress)
            self.last_progress = now

    def on_evaluate(self, args, state, control, metrics=None, **kw):  # type: ignore[no-untyped-def]
        if metrics and "eval_loss" in metrics:
            self.valid_loss = float(metrics["eval_loss"])
            self.hooks.on_metrics(state.global_step, {"valid_loss": self.valid_loss})

    def on_save(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not complete_checkpoint(path):
            return
        train_loss = self.loss_history[-1][1] if self.loss_history else None
        metrics: dict[str, Any] = {"step": state.global_step, "train_loss": train_loss}
        if self.valid_loss is not None:
            metrics["valid_loss"] = self.valid_loss
        self.hooks.on_checkpoint(state.global_step, path, metrics)


def training_arguments(spec: TrainingSpec, output_dir: Path, device: str,
                       has_eval: bool) -> TrainingArguments:
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


def save_adapter(model: PeftModel, spec: TrainingSpec, dest: Path, extra: dict[str, Any]) -> Path:
    """Save the final adapter in PEFT layout, plus the prompt format, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".adapter-"))
    model.save_pretrained(str(tmp), safe_serialization=True)
    meta = {"base_model": spec.model, "prompt_format": spec.prompt_format.model_dump(mode="json"),
            "max_length": spec.max_length, **extra}
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


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
    callback = _JobCallback(hooks, spec, start_step)
    trainer = _AtomicTrainer(
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
    hooks.on_start({"trainable_parameters": trainable, "total_parameters": total,
                    "examples": data.examples, "dropped_too_long": data.dropped_too_long,
                    "validation_examples": data.validation_examples,
                    "total_steps": total_steps, "start_step": start_step})
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


__all__ = ["COMPLETE_MARKER", "Hooks", "ModelLoadError", "Result", "StopTraining",
           "load_tokenizer", "train_adapter"]
