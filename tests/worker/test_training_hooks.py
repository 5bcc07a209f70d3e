"""What ``train_adapter`` tells its :class:`Hooks`: typed events, in the Trainer's order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.worker.test_packing import spec  # noqa: E402
from worker.preprocess import prepare  # noqa: E402
from worker.training import (  # noqa: E402
    CheckpointInfo,
    FullValidationMetrics,
    Hooks,
    Progress,
    StartInfo,
    TrainMetrics,
    ValidationMetrics,
    train_adapter,
)
from worker.training.adapter_io import ADAPTER_META  # noqa: E402

Event = (StartInfo | Progress | TrainMetrics | ValidationMetrics | FullValidationMetrics
         | CheckpointInfo)


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_start(self, info: StartInfo) -> None:
        self.events.append(info)

    def on_progress(self, progress: Progress) -> None:
        self.events.append(progress)

    def on_metrics(self, metrics: TrainMetrics | ValidationMetrics | FullValidationMetrics
                   ) -> None:
        self.events.append(metrics)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self.events.append(checkpoint)


def of(kind: type[Any], events: list[Event]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_hooks_hear_start_metrics_progress_and_checkpoints(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    settings_env()
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_bytes(jsonl_bytes(dialogsum_records(8)))
    valid.write_bytes(jsonl_bytes(dialogsum_records(4, offset=8)))
    job = spec(model=str(tiny_model), max_steps=4, batch_size=2, save_steps=2, logging_steps=2)
    data = prepare(job, tiny_tokenizer, train, hashlib.sha256(train.read_bytes()).hexdigest(),
                   valid, hashlib.sha256(valid.read_bytes()).hexdigest())
    hooks = Recorder()

    result = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "adapter",
                           device="cpu", hooks=hooks,
                           adapter_meta={"fine_tuned_model": "ft:tiny"})

    start = hooks.events[0]
    assert isinstance(start, StartInfo)
    assert (start.examples, start.validation_examples) == (8, 4)
    assert (start.total_steps, start.start_step) == (4, 0)
    assert 0 < start.trainable_parameters < start.total_parameters
    assert [m.step for m in of(TrainMetrics, hooks.events)] == [2, 4]
    valid_losses = of(ValidationMetrics, hooks.events)
    assert [m.step for m in valid_losses] == [2, 4]
    progress = of(Progress, hooks.events)
    assert {2, 4} <= {p.step for p in progress}
    assert all(p.total_steps == 4 and p.trained_tokens > 0 for p in progress)
    saved = of(CheckpointInfo, hooks.events)
    assert [c.step for c in saved] == [2, 4]
    for checkpoint, measured in zip(saved, valid_losses, strict=True):
        assert checkpoint.path == tmp_path / "ckpt" / f"checkpoint-{checkpoint.step}"
        assert checkpoint.path.is_dir()
        # Training ended at step 4: its evaluation is also the full validation of the end.
        full = ({"full_valid_loss": measured.valid_loss,
                 "full_valid_mean_token_accuracy": measured.valid_mean_token_accuracy}
                if checkpoint.step == 4 else {})
        assert checkpoint.metrics() == {
            "step": checkpoint.step, "train_loss": checkpoint.train_loss,
            "train_mean_token_accuracy": checkpoint.train_mean_token_accuracy,
            "valid_loss": measured.valid_loss,
            "valid_mean_token_accuracy": measured.valid_mean_token_accuracy, **full}
        assert 0 <= checkpoint.train_mean_token_accuracy <= 1
        assert 0 <= measured.valid_mean_token_accuracy <= 1
    final = of(FullValidationMetrics, hooks.events)
    assert [(f.step, f.full_valid_loss) for f in final] == [(4, valid_losses[-1].valid_loss)]
    assert result.adapter_dir == tmp_path / "adapter" and result.stopped is None
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
    assert (meta["base_model"], meta["fine_tuned_model"]) == (str(tiny_model), "ft:tiny")
    assert (meta["steps"], meta["trained_tokens"]) == (4, result.trained_tokens)


def test_checkpoint_metrics_name_valid_loss_only_when_measured() -> None:
    without = CheckpointInfo(step=3, path=Path("c"), train_loss=1.5, valid_loss=None)
    measured = CheckpointInfo(step=3, path=Path("c"), train_loss=None, valid_loss=0.5)

    assert without.metrics() == {"step": 3, "train_loss": 1.5}
    assert measured.metrics() == {"step": 3, "train_loss": None, "valid_loss": 0.5}
