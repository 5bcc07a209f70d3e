"""Side A of the training benchmark: the seed recipe, as it was written before lorafleet.

Batched tokenization of the whole text with ``max_length`` and truncation, samples that reach
``max_length`` dropped, ``DataCollatorForLanguageModeling(mlm=False)`` (pads to the batch's
longest sample, labels = input_ids with padding masked), a plain ``Trainer`` on a PEFT model.
Only the counting collator wrapper is the benchmark's: it tallies real and padded tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import read_records, render_record


@dataclass(frozen=True)
class Hyper:
    """What both sides share: steps, effective batch, optimizer and LoRA settings."""

    steps: int
    batch_size: int
    grad_accum: int
    max_length: int
    learning_rate: float = 2e-4
    warmup: int = 2
    seed: int = 42
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05

    @property
    def examples(self) -> int:
        """Examples consumed by ``steps`` optimizer steps (one epoch, no example twice)."""
        return self.steps * self.batch_size * self.grad_accum


@dataclass
class RunResult:
    """One training run of either side."""

    label: str
    train_seconds: float
    real_tokens: int
    padded_tokens: int  # tokens the model ran on, padding included
    steps: int
    adapter_dir: Path
    dropped: int = 0
    first_step_seconds: float = 0.0  # from the start of the loop to the end of step 1
    first_step_tokens: int = 0
    # CPU time of this process over the same span: with one torch thread, the work done,
    # which other processes on a shared machine do not inflate (0.0: not measured).
    cpu_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.train_seconds

    @property
    def steady_tokens_per_second(self) -> float:
        """Throughput after the first step (which carries warm-up, and compilation)."""
        rest = self.train_seconds - self.first_step_seconds
        return (self.real_tokens - self.first_step_tokens) / rest if rest > 0 else 0.0


class StepClock:
    """Marks the end of the first optimizer step (call :meth:`tick` once per step)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start


class CountingCollator:
    """Wraps a collator and counts the real (attention-mask) and padded tokens it emits."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.padded = 0
        # Real tokens per batch, in order (the data loader runs ahead of the training step).
        self.batches: list[int] = []

    @property
    def real(self) -> int:
        return sum(self.batches)

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        self.padded += int(batch["input_ids"].numel())
        mask = batch.get("attention_mask")
        self.batches.append(int(mask.sum()) if mask is not None
                            else int(batch["input_ids"].numel()))
        return batch


def train_recipe(model_dir: Path, train_file: Path, out_dir: Path, hp: Hyper, *,
                 group_by_length: bool = False, bf16: bool = False, fp16: bool = False,
                 label: str = "A: recipe") -> RunResult:
    """Train one LoRA adapter the seed recipe's way; time ``trainer.train()`` only."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from worker.training.model import TARGET_MODULES

    set_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_record(r).text for r in read_records(train_file)]
    dataset = Dataset.from_dict({"text": texts})

    def _tokenize(batch: dict[str, list[str]]) -> Any:
        return tokenizer(batch["text"], max_length=hp.max_length, truncation=True)

    dataset = dataset.map(_tokenize, batched=True, remove_columns=["text"])
    before = len(dataset)
    dataset = dataset.filter(lambda sample: len(sample["input_ids"]) < hp.max_length)

    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = get_peft_model(model, LoraConfig(
        r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
        target_modules=TARGET_MODULES[model.config.model_type], bias="none",
        task_type="CAUSAL_LM"))
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum,
        learning_rate=hp.learning_rate,
        warmup_steps=hp.warmup,
        max_steps=hp.steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=hp.steps,  # one checkpoint, at the end: as lorafleet's side is run
        seed=hp.seed,
        data_seed=hp.seed,
        report_to="none",
        disable_tqdm=True,
        bf16=bf16,
        fp16=fp16,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )
    clock = StepClock()

    class _Clock(TrainerCallback):  # the benchmark's, not the recipe's
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.tick()

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=[_Clock()])
    clock.start = t0 = time.perf_counter()
    cpu0 = time.process_time()
    trainer.train()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    adapter = out_dir / "adapter"
    model.save_pretrained(str(adapter))
    return RunResult(label, seconds, collator.real, collator.padded, trainer.state.global_step,
                     adapter, dropped=before - len(dataset),
                     first_step_seconds=clock.first or 0.0,
                     first_step_tokens=sum(collator.batches[:hp.grad_accum]),
                     cpu_seconds=cpu)
