"""OpenAI's metrics from the training run: token accuracy, full validation, the results file,
early stopping and the delivered best adapter, trained tokens."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.worker.test_packing import features, spec  # noqa: E402
from worker.collate import make_collator  # noqa: E402
from worker.preprocess import IGNORE_INDEX, Prepared, prepare  # noqa: E402
from worker.training import (  # noqa: E402
    EarlyStop,
    FullValidationMetrics,
    Hooks,
    Metrics,
    TrainMetrics,
    ValidationMetrics,
    train_adapter,
)
from worker.training.accuracy import TokenAccuracy  # noqa: E402
from worker.training.early_stopping import EarlyStopping  # noqa: E402
from worker.training.results import StepMetrics, results_csv, step_metrics  # noqa: E402

VOCAB = 50


class Recorder(Hooks):
    def __init__(self) -> None:
        self.metrics: list[Metrics] = []
        self.stops: list[EarlyStop] = []

    def on_metrics(self, metrics: Metrics) -> None:
        self.metrics.append(metrics)

    def on_early_stop(self, stop: EarlyStop) -> None:
        self.stops.append(stop)


def prepared(tmp_path: Path, tokenizer: Any, job: Any, train: int = 8, valid: int = 4
             ) -> Prepared:
    train_file, valid_file = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train_file.write_bytes(jsonl_bytes(dialogsum_records(train)))
    valid_file.write_bytes(jsonl_bytes(dialogsum_records(valid, offset=train)))
    return prepare(job, tokenizer, train_file, hashlib.sha256(train_file.read_bytes()).hexdigest(),
                   valid_file, hashlib.sha256(valid_file.read_bytes()).hexdigest())


# --------------------------------------------------------------------------- token accuracy
def guessing(targets: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is the target where the target is even, and wrong where it is odd."""
    guess = torch.where(targets % 2 == 0, targets, (targets + 1) % VOCAB).clamp(min=0)
    return torch.nn.functional.one_hot(guess, VOCAB).float()


def even_share(targets: torch.Tensor) -> float:
    scored = targets[targets != IGNORE_INDEX]
    return (scored % 2 == 0).sum().item() / scored.numel()


@pytest.mark.parametrize(("packing", "loss_only"), [(True, True), (False, True), (True, False),
                                                     (False, False)],
                         ids=["packed", "padded", "packed-all-logits", "padded-all-logits"])
def test_token_accuracy_reads_every_batch_layout(packing: bool, loss_only: bool,
                                                 tiny_tokenizer: Any) -> None:
    """Whatever rows of logits the collator asked the LM head for, each is scored against its
    own target; position t predicts token t + 1 where the model returns every position."""
    batch = make_collator(tiny_tokenizer, packing=packing,
                          loss_only_where_labeled=loss_only)(features(VOCAB))
    if loss_only:
        logits = guessing(batch["shift_labels"])
        if packing:
            logits = logits.unsqueeze(0)  # (1, n, V), as the model returns a packed row's
        targets = batch["shift_labels"]
    else:
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        logits = guessing(shifted)  # (B, T, V): row t guesses label t + 1
        targets = shifted
    accuracy = TokenAccuracy()

    accuracy.add(logits, batch)
    accuracy.add(logits, batch)  # two batches: counts add up

    assert accuracy.take() == pytest.approx(even_share(targets))
    assert accuracy.take() is None  # taken: counting starts over


def test_token_accuracy_is_what_a_full_forward_pass_predicts(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """The validation accuracy counted from the loss's logits (packed rows, LM head and last
    layer on the loss positions only) equals an independent count: the delivered adapter,
    one example at a time, every position's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings_env()
    # A high learning rate, so that the tiny random model gets some tokens right.
    job = spec(model=str(tiny_model), max_steps=4, batch_size=2, save_steps=2, logging_steps=1,
               learning_rate=0.05)
    data = prepared(tmp_path, tiny_tokenizer, job)
    hooks = Recorder()

    result = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "adapter",
                           device="cpu", hooks=hooks)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      result.adapter_dir).eval()
    correct = scored = 0
    with torch.no_grad():
        for example in data.validation:
            logits = model(torch.tensor([example["input_ids"]])).logits[0]
            targets = torch.tensor(example["labels"][1:])
            keep = targets != IGNORE_INDEX
            correct += int((logits[:-1].argmax(-1)[keep] == targets[keep]).sum())
            scored += int(keep.sum())
    full = [m for m in hooks.metrics if isinstance(m, FullValidationMetrics)]
    assert correct > 0, "the comparison needs some right tokens"
    assert [(m.step, m.full_valid_mean_token_accuracy) for m in full] == [(4, correct / scored)]
    train = [m for m in hooks.metrics if isinstance(m, TrainMetrics)]
    assert [m.step for m in train] == [1, 2, 3, 4]
    assert all(0 <= m.train_mean_token_accuracy <= 1 for m in train)


# --------------------------------------------------------------------------- results file
def test_results_rows_follow_the_log_history_once_per_step() -> None:
    history = [
        {"loss": 2.5, "mean_token_accuracy": 0.25, "step": 1},
        {"loss": 2.0, "mean_token_accuracy": 0.5, "step": 2},
        {"eval_loss": 2.25, "eval_mean_token_accuracy": 0.375, "step": 2},
        {"loss": 1.75, "step": 3},  # no accuracy logged (an older checkpoint's history)
        {"loss": 1.5, "mean_token_accuracy": 0.625, "step": 3},  # redone by a later attempt
        {"train_runtime": 3.0, "train_loss": 2.0, "step": 3},  # the run's summary: no row
    ]

    rows = step_metrics(history)

    assert rows == [StepMetrics(1, 2.5, 0.25), StepMetrics(2, 2.0, 0.5, 2.25, 0.375),
                    StepMetrics(3, 1.5, 0.625)]
    text = results_csv(rows).decode()
    assert text.splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "1,2.5,0.25,,", "2,2.0,0.5,2.25,0.375", "3,1.5,0.625,,"]
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert float(parsed[1]["valid_loss"]) == 2.25


# --------------------------------------------------------------------------- early stopping
def test_patience_counts_evaluations_that_do_not_improve_by_the_threshold() -> None:
    early = EarlyStopping(patience=2, threshold=0.1)

    assert not early.observe(10, 2.0)  # the first evaluation is the best so far
    assert not early.observe(20, 1.95)  # better, but not by more than 0.1: waits 1
    assert (early.best_step, early.best_loss, early.waited) == (20, 1.95, 1)
    assert not early.observe(30, 1.5)  # improves by 0.45: the count starts over
    assert not early.observe(40, 1.5)  # a tie is no improvement, and no new best
    assert early.observe(50, 1.7)
    assert (early.stopped_at, early.best_step, early.best_loss) == (50, 30, 1.5)


def test_replaying_the_log_history_counts_as_the_evaluations_did() -> None:
    losses = [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.1)]
    live = EarlyStopping(patience=3)
    for step, loss in losses:
        live.observe(step, loss)
    history = [entry for step, loss in losses
               for entry in ({"loss": 9.0, "step": step}, {"eval_loss": loss, "step": step})]
    resumed = EarlyStopping(patience=3, best_step=99, waited=7)

    resumed.replay(history)

    assert resumed == live
    assert (resumed.best_step, resumed.waited, resumed.stopped_at) == (4, 2, None)


def test_early_stopping_ends_the_run_with_the_best_checkpoints_adapter(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """A threshold nothing reaches: the run stops after ``patience`` more evaluations, and the
    adapter delivered is bit for bit the checkpoint with the lowest validation loss."""
    from safetensors.torch import load_file

    settings_env()
    job = spec(model=str(tiny_model), max_steps=8, batch_size=2, save_steps=1, logging_steps=1,
               learning_rate=2.0, early_stopping_patience=2, early_stopping_threshold=100.0)
    data = prepared(tmp_path, tiny_tokenizer, job)
    hooks = Recorder()

    result = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "adapter",
                           device="cpu", hooks=hooks)

    losses = {m.step: m.valid_loss for m in hooks.metrics if isinstance(m, ValidationMetrics)}
    best = min(losses, key=lambda s: (losses[s], s))
    assert result.stopped is None and result.step == 3  # evaluations 2 and 3 did not improve
    assert sorted(losses) == [1, 2, 3]
    assert result.early_stop == EarlyStop(step=3, best_step=best, best_valid_loss=losses[best],
                                          patience=2, threshold=100.0)
    assert hooks.stops == [result.early_stop]
    assert result.best_checkpoint == tmp_path / "ckpt" / f"checkpoint-{best}"
    delivered = load_file(result.adapter_dir / "adapter_model.safetensors")
    saved = load_file(result.best_checkpoint / "adapter_model.safetensors")
    assert delivered.keys() == saved.keys()
    assert all(torch.equal(delivered[k], saved[k]) for k in saved)
    assert [r.step for r in result.metrics] == [1, 2, 3]


def test_a_job_that_resumes_after_early_stopping_ended_it_only_finishes(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """An attempt that died between the early stop and the end: the next one resumes from the
    stopping checkpoint, trains no further step, and delivers the same best adapter."""
    from safetensors.torch import load_file

    settings_env()
    job = spec(model=str(tiny_model), max_steps=8, batch_size=2, save_steps=1, logging_steps=1,
               learning_rate=2.0, early_stopping_patience=1, early_stopping_threshold=100.0)
    data = prepared(tmp_path, tiny_tokenizer, job)
    first = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "first",
                          device="cpu")
    assert first.early_stop is not None

    again = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "again",
                          device="cpu", resume_from=tmp_path / "ckpt" / f"checkpoint-{first.step}")

    assert (again.step, again.trained_tokens, again.early_stop) == (
        first.step, first.trained_tokens, first.early_stop)
    a = load_file(first.adapter_dir / "adapter_model.safetensors")
    b = load_file(again.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- trained tokens
def test_trained_tokens_are_every_training_token_of_every_epoch(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    settings_env()
    job = spec(model=str(tiny_model), n_epochs=2, batch_size=3, save_steps=100)
    data = prepared(tmp_path, tiny_tokenizer, job, train=6, valid=2)

    result = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "adapter",
                           device="cpu")

    assert result.trained_tokens == 2 * sum(len(ids) for ids in data.train["input_ids"])


# --------------------------------------------------------------------------- estimated finish
def test_the_eta_is_the_pace_of_the_timed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 2 and 3 took 10 s each after the first logged one: 2 steps left are 20 s."""
    from types import SimpleNamespace

    from worker.training import Progress, callbacks

    now = [100.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: now[0]))
    seen: list[Progress] = []

    class Seen(Hooks):
        def on_progress(self, progress: Progress) -> None:
            seen.append(progress)

    callback = callbacks.JobCallback(Seen(), spec(logging_steps=1), start_step=0)
    for step in (1, 2, 3):
        state = SimpleNamespace(global_step=step, max_steps=5, epoch=step / 5,
                                num_input_tokens_seen=100 * step)
        callback.on_log(None, state, None, logs={"loss": 1.0})
        now[0] += 10.0

    assert [p.eta_seconds for p in seen] == [None, 30.0, 20.0]
    assert [p.tokens_per_second for p in seen] == [None, 10.0, 10.0]
