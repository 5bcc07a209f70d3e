"""LoRA training of one job: ``setup → train → save`` around transformers' Trainer.

- :mod:`~worker.training.model`: the base model on its device and dtype, 4-bit or not, with a
  fresh LoRA adapter on the projections of its architecture.
- :mod:`~worker.training.trainer`: the training run itself (:func:`train_adapter`), the same
  for every method, and the method of a job (:func:`method_for`).
- :mod:`~worker.training.method`: what a training method provides (its data, its Trainer) and
  the arguments every method's Trainer shares.
- :mod:`~worker.training.supervised`: supervised fine-tuning (transformers' Trainer).
- :mod:`~worker.training.dpo`: preference tuning (TRL's ``DPOTrainer``), on the pairs
  :mod:`~worker.training.preference_data` tokenizes.
- :mod:`~worker.training.saving`: the checkpoint save of every method's Trainer: checkpoints
  only ever exist complete, and a worker that lost its lease never moves one into place.
- :mod:`~worker.training.callbacks`: the Trainer's events turned into :class:`Hooks` calls.
- :mod:`~worker.training.hooks`: what the caller learns (typed events) and how it stops training.
- :mod:`~worker.training.adapter_io`: the trained adapter and its metadata on disk.
- :mod:`~worker.training.probe`: the parity probe, the greedy tokens of a fixed prompt stored
  with the adapter so that an inference engine can check that it generates the same.
- :mod:`~worker.training.accuracy`: token accuracy from the logits the loss already used.
- :mod:`~worker.training.early_stopping`: stop when the validation loss stops improving.
- :mod:`~worker.training.results`: the per-step metrics and the job's results file.
- :mod:`~worker.training.wandb_run`: the job's Weights & Biases run (online or offline).

This package knows nothing of the database or Celery: the job runner passes :class:`Hooks` that
report progress and say when to stop, and benchmarks call :func:`train_adapter` directly.
"""

from worker.training.hooks import (
    CheckpointInfo,
    EarlyStop,
    FullValidationMetrics,
    Hooks,
    Metrics,
    Progress,
    StartInfo,
    StopTraining,
    TrainMetrics,
    ValidationMetrics,
    metrics_data,
)
from worker.training.trainer import Result, method_for, train_adapter

__all__ = ["CheckpointInfo", "EarlyStop", "FullValidationMetrics", "Hooks", "Metrics",
           "Progress", "Result", "StartInfo", "StopTraining", "TrainMetrics",
           "ValidationMetrics", "method_for", "metrics_data", "train_adapter"]
