"""Preference tuning (OpenAI's ``method.type: "dpo"``) with TRL's ``DPOTrainer``.

The reference model is never a second copy of the model:

* a new adapter goes to TRL through ``peft_config``: the reference is the base model, the
  adapter disabled (a fresh LoRA adapter computes the base model exactly, so the rewards of
  step 0 are 0);
* a job that continues a fine-tuned model (an SFT adapter) passes that adapter, trainable: TRL
  copies it into a frozen ``ref`` adapter, so the reference is the SFT policy the job starts
  from, not the bare base model.

The job's spec is mapped onto ``DPOConfig`` explicitly, since its defaults are a GPU's (bf16,
activation checkpointing on, learning rate 1e-6, max_length 1024): see :func:`dpo_config`.
Dropout is off (TRL's ``disable_dropout``), so that the policy and its reference score a pair
with the same network; the adapter's ``lora.dropout`` is kept in its config, unused here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from modelio.loading import ModelLoadError
from shared.schemas import TrainingSpec
from worker.preprocess import Prepared
from worker.training.method import Setup, arguments
from worker.training.model import continued_adapter, load_base, lora_config
from worker.training.preference_data import prepare_pairs
from worker.training.saving import AtomicCheckpoints

# What DPOTrainer logs per step (evaluations prefixed eval_) that a job reports beside the loss.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


class PreferenceTrainer(AtomicCheckpoints, DPOTrainer):
    """TRL's ``DPOTrainer`` with lorafleet's checkpoint save (:class:`AtomicCheckpoints`), on
    pairs that :mod:`~worker.training.preference_data` tokenized."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[no-untyped-def]
        # Already token ids, tokenized as supervised jobs are and as inference renders a
        # request (TRL would tokenize prompt and prompt + answer together, with BOS).
        return dataset

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # TRL writes a README.md beside the checkpoints at each save; the adapter carries
        # lorafleet.json instead.
        return None

    def _send_telemetry(self) -> None:
        # A self-hosted service tells the hub nothing about its jobs.
        return None


def dpo_config(spec: TrainingSpec, output_dir: Path, device: str, has_eval: bool) -> DPOConfig:
    """The job's spec as TRL's ``DPOConfig``: the arguments every method shares (precision,
    checkpointing, learning rate, logging: each set whatever DPOConfig's default), then DPO's."""
    dpo = spec.dpo
    if dpo is None:
        raise ValueError("a DPO job's spec carries its DPO settings")
    losses, weights = [dpo.loss_type], [1.0]
    if dpo.rpo_alpha:  # RPO: the preferred answers' language-modelling loss, weighted
        losses.append("sft")
        weights.append(dpo.rpo_alpha)
    return arguments(
        DPOConfig, spec, output_dir, device, has_eval,
        beta=dpo.beta,
        loss_type=losses,
        loss_weights=weights,
        # Pairs reaching max_length were dropped in preprocessing: the collator never cuts.
        max_length=spec.max_length,
        disable_dropout=True,
        precompute_ref_log_probs=False,
        pad_to_multiple_of=None,
    )


class Dpo:
    """The DPO method: preference pairs, :class:`PreferenceTrainer`."""

    name = "dpo"
    metric_names = METRICS

    def prepare(self, spec: TrainingSpec, tokenizer: Any, train_path: Path, train_hash: str,
                valid_path: Path | None = None, valid_hash: str | None = None) -> Prepared:
        return prepare_pairs(spec, tokenizer, train_path, train_hash, valid_path, valid_hash)

    def setup(self, spec: TrainingSpec, tokenizer: Any, data: Prepared, output_dir: Path,
              device: str, callback: TrainerCallback) -> Setup:
        base = load_base(spec, device)
        if spec.initial_adapter is not None:
            model, peft_config = continued_adapter(base, spec), None
        else:
            model, peft_config = base, lora_config(spec, base)
        try:
            trainer = PreferenceTrainer(
                model=model,
                args=dpo_config(spec, output_dir, device, data.validation is not None),
                train_dataset=data.train,
                eval_dataset=data.validation,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[callback],
            )
        except ValueError as e:  # the adapter's targets, or a setting TRL refuses
            param = "lora.target_modules" if spec.lora.target_modules else "model"
            raise ModelLoadError(f"DPO on '{spec.model}': {e}", param=param) from e
        peft_model: Any = trainer.model
        trainable, total = peft_model.get_nb_trainable_parameters()
        return Setup(trainer, peft_model, trainable, total,
                     math.ceil(len(data.train) / spec.batch_size))


METHOD = Dpo()
