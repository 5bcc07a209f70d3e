"""What a training method is to a training run (:func:`~worker.training.trainer.train_adapter`):
how it turns a job's files into a data set, and the Trainer it trains the adapter with.

Each method is a module of its own (:mod:`~worker.training.supervised`,
:mod:`~worker.training.dpo`) whose ``METHOD`` satisfies :class:`TrainingMethod`;
:func:`worker.training.trainer.method_for` picks one by the job's ``method``. The run around
the Trainer (resume, hooks, early stopping, the best checkpoint, the parity probe, the adapter's
save) is the same for all, and so is the checkpoint save (:mod:`~worker.training.saving`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments

from shared.schemas import TrainingSpec
from worker.preprocess import Prepared

log = logging.getLogger(__name__)
Args = TypeVar("Args", bound=TrainingArguments)


@dataclass
class Setup:
    """A method's Trainer, ready to train (or resume) the job's adapter."""

    trainer: Trainer  # an AtomicCheckpoints Trainer, with the run's callback
    model: PeftModel  # the model it trains, the job's adapter active
    trainable: int  # parameters
    total: int
    batches_per_epoch: int


class TrainingMethod(Protocol):
    """One way of training an adapter (OpenAI's ``method.type``)."""

    @property
    def name(self) -> str: ...

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What its Trainer logs beyond ``loss`` and ``mean_token_accuracy``, by the Trainer's
        names; evaluations log them prefixed ``eval_``. They reach the job's metrics events
        (evaluations as ``valid_<name>``), its results file and its W&B run."""
        ...

    def prepare(self, spec: TrainingSpec, tokenizer: Any, train_path: Path, train_hash: str,
                valid_path: Path | None = None, valid_hash: str | None = None) -> Prepared:
        """The job's files as tokenized data sets, cached across attempts.

        Raises:
            InvalidDataset: naming the file and line of a record that does not fit.
        """
        ...

    def setup(self, spec: TrainingSpec, tokenizer: Any, data: Prepared, output_dir: Path,
              device: str, callback: TrainerCallback) -> Setup:
        """Load the model and build the Trainer, checkpointing into ``output_dir``.

        Raises:
            ModelLoadError: the base model or the adapter does not load.
        """
        ...


def arguments(cls: type[Args], spec: TrainingSpec, output_dir: Path, device: str,
              has_eval: bool, **extra: Any) -> Args:
    """The job's spec as ``cls`` (``TrainingArguments`` or a subclass such as TRL's
    ``DPOConfig``), with what every method shares set explicitly, whatever the class's
    defaults: checkpointing into ``output_dir``, the schedule, the device and precision."""
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    fp16 = device.startswith("cuda") and not bf16
    args = cls(
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
        **extra,
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
    """Arguments for activation (gradient) checkpointing, by the name this version of
    transformers uses (``activation_checkpointing`` in recent releases, else the old name).
    Given either way: TRL's configs default it to on."""
    # Non-reentrant: works with a frozen base whose inputs need no gradient (LoRA).
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}
