"""Supervised fine-tuning (OpenAI's ``method.type: "supervised"``): the loss on each record's
response tokens, with transformers' Trainer, packed rows and token-budget batches."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from shared.schemas import TrainingSpec
from worker.collate import make_collator
from worker.last_layer import is_patched as last_layer_patched
from worker.preprocess import Prepared, prepare
from worker.token_batches import TokenBudgetBatchSampler, token_budget
from worker.training.accuracy import TokenAccuracy
from worker.training.method import Setup, arguments
from worker.training.model import load_model
from worker.training.saving import AtomicCheckpoints

log = logging.getLogger(__name__)


class SupervisedTrainer(AtomicCheckpoints, Trainer):
    """transformers' Trainer with lorafleet's checkpoint save (:class:`AtomicCheckpoints`).

    It also logs the token accuracy of training steps (``mean_token_accuracy``) and evaluations
    (``eval_mean_token_accuracy``), counted from the logits each loss was computed from.
    """

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


def training_arguments(spec: TrainingSpec, output_dir: Path, device: str,
                       has_eval: bool) -> TrainingArguments:
    """The job's spec as transformers' ``TrainingArguments``, checkpointing into ``output_dir``."""
    return arguments(TrainingArguments, spec, output_dir, device, has_eval)


class Supervised:
    """The supervised method: ``worker.preprocess`` data, :class:`SupervisedTrainer`."""

    name = "supervised"
    metric_names: tuple[str, ...] = ()

    def prepare(self, spec: TrainingSpec, tokenizer: Any, train_path: Path, train_hash: str,
                valid_path: Path | None = None, valid_hash: str | None = None) -> Prepared:
        return prepare(spec, tokenizer, train_path, train_hash, valid_path, valid_hash)

    def setup(self, spec: TrainingSpec, tokenizer: Any, data: Prepared, output_dir: Path,
              device: str, callback: TrainerCallback) -> Setup:
        model, trainable, total = load_model(spec, device)
        trainer = SupervisedTrainer(
            model=model,
            args=training_arguments(spec, output_dir, device, data.validation is not None),
            train_dataset=data.train,
            eval_dataset=data.validation,
            data_collator=make_collator(tokenizer, packing=spec.packing,
                                        last_layer=last_layer_patched(model)),
            processing_class=tokenizer,
            callbacks=[callback],
        )
        budget = (token_budget(spec.max_tokens_per_batch, device, spec.max_length)
                  if spec.packing else None)
        batches_per_epoch = math.ceil(len(data.train) / spec.batch_size)
        if budget is not None:
            lengths = [len(ids) for ids in data.train["input_ids"]]
            trainer.batch_sampler = TokenBudgetBatchSampler(lengths, budget, spec.seed)
            batches_per_epoch = len(trainer.batch_sampler)
            log.info("batches of at most %d tokens: %d per epoch (%d examples)", budget,
                     batches_per_epoch, len(lengths))
        return Setup(trainer, model, trainable, total, batches_per_epoch)


METHOD = Supervised()
