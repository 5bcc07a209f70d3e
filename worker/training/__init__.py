"""LoRA training of one job: ``setup → train → save`` around transformers' Trainer.

- :mod:`~worker.training.model`: the base model on its device and dtype, 4-bit or not, with a
  fresh LoRA adapter on the projections of its architecture.
- :mod:`~worker.training.trainer`: the training run itself (:func:`train_adapter`), the job's
  spec as ``TrainingArguments``, and a Trainer whose checkpoints only ever exist complete.
- :mod:`~worker.training.callbacks`: the Trainer's events turned into :class:`Hooks` calls.
- :mod:`~worker.training.hooks`: what the caller learns (typed events) and how it stops training.
- :mod:`~worker.training.adapter_io`: the trained adapter and its metadata on disk.

This package knows nothing of the database or Celery: the job runner passes :class:`Hooks` that
report progress and say when to stop, and benchmarks call :func:`train_adapter` directly.
"""

from worker.training.hooks import (
    CheckpointInfo,
    Hooks,
    Progress,
    StartInfo,
    StopTraining,
    TrainMetrics,
    ValidationMetrics,
)
from worker.training.trainer import Result, train_adapter

__all__ = ["CheckpointInfo", "Hooks", "Progress", "Result", "StartInfo", "StopTraining",
           "TrainMetrics", "ValidationMetrics", "train_adapter"]
