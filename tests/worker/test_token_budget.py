"""Token-budget batches: batches up to ``max_tokens_per_batch`` tokens, the same for a given seed
and epoch whatever happened before, so that a resumed run sees the batches of an
uninterrupted one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.worker.test_packing import spec  # noqa: E402
from worker.token_batches import (  # noqa: E402
    CUDA_DEFAULT_TOKENS,
    TokenBudgetBatchSampler,
    pack,
    token_budget,
)

LENGTHS = [int(n) for n in torch.randint(5, 120, (300,), generator=torch.Generator()
                                         .manual_seed(3))]


def test_batches_hold_every_example_once_within_the_budget() -> None:
    batches = pack(LENGTHS, 400, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 400 for b in batches)
    # Greedy: a batch closes only when the next example would not fit.
    assert all(sum(LENGTHS[i] for i in b) + LENGTHS[nxt[0]] > 400
               for b, nxt in zip(batches, batches[1:], strict=False))
    assert pack(LENGTHS, 400, seed=7) == batches
    assert pack(LENGTHS, 400, seed=8) != batches


def test_an_example_longer_than_the_budget_is_a_batch_of_its_own() -> None:
    for seed in range(4):
        batches = pack([10, 50, 10], 20, seed=seed)
        assert [1] in batches
        assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_epochs_visit_the_same_batches_in_an_order_of_their_own() -> None:
    sampler = TokenBudgetBatchSampler(LENGTHS, 400, seed=7)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert len(epochs[0]) == len(epochs[1]) == len(sampler)
    assert sorted(epochs[0]) == sorted(epochs[1])
    assert epochs[0] != epochs[1]
    assert epochs[2] == epochs[0], "a function of seed and epoch only"
    fresh = TokenBudgetBatchSampler(LENGTHS, 400, seed=7)
    fresh.set_epoch(1)
    assert list(fresh) == epochs[1]


def test_the_budget_of_a_job() -> None:
    assert token_budget("auto", "cuda", 512) == CUDA_DEFAULT_TOKENS == 16384
    assert token_budget("auto", "cuda:0", 32768) == 32768
    assert token_budget("auto", "cpu", 512) is None  # CPU: batches of batch_size, as before
    assert token_budget(None, "cuda", 512) is None
    assert token_budget(2048, "cpu", 512) == 2048


def test_the_trainer_resumes_mid_epoch_on_the_same_batches(tmp_path: Path) -> None:
    """The Trainer's own resume path (skip the trained batches of the epoch, then set the
    epoch) on the dataloader of a token-budget job yields the rest of that epoch's batches."""
    from accelerate import skip_first_batches
    from transformers import TrainingArguments

    from worker.training.supervised import SupervisedTrainer

    data = [{"i": i} for i in range(len(LENGTHS))]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = SupervisedTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=data,
                                data_collator=lambda rows: [r["i"] for r in rows])
    sampler = TokenBudgetBatchSampler(LENGTHS, 400, seed=7)
    trainer.batch_sampler = sampler
    loader = trainer.get_train_dataloader()
    assert len(loader) == len(sampler)

    def epoch_batches(dl: Any, epoch: int) -> list[list[int]]:
        # As transformers' Trainer._run_epoch does, after any skip.
        dl.set_epoch(epoch)
        inner = getattr(getattr(dl, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        return [list(b) for b in dl]

    full = {epoch: epoch_batches(loader, epoch) for epoch in (0, 1)}
    assert full[0] != full[1]
    resumed = epoch_batches(skip_first_batches(loader, 3), 1)
    assert resumed == full[1][3:]


def test_a_token_budget_job_trains_one_step_per_batch(settings_env: Any, tiny_model: Path,
                                                      tiny_tokenizer: Any,
                                                      tmp_path: Path) -> None:
    from worker.preprocess import prepare
    from worker.training import trainer

    settings_env()
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(dialogsum_records(12)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fixed = spec(model=str(tiny_model), n_epochs=1, batch_size=4, max_length=1024,
                 save_steps=100)
    data = prepare(fixed, tiny_tokenizer, path, digest)  # the budget does not change the data
    lengths = [len(ids) for ids in data.train["input_ids"]]
    by_size = -(-len(lengths) // 4)
    # The smallest budget the API allows (from max_length up) whose batches differ from
    # batch_size's, whatever records the data set gives: otherwise the steps counted below
    # could be batch_size's and the test would not see the budget at all.
    budget = next(b for b in range(fixed.max_length, sum(lengths) + fixed.max_length + 1, 128)
                  if len(TokenBudgetBatchSampler(lengths, b, fixed.seed)) != by_size)
    job = fixed.model_copy(update={"max_tokens_per_batch": budget})
    batches = len(TokenBudgetBatchSampler(lengths, budget, job.seed))
    assert batches != by_size, "the budget changes the batches"
    result = trainer.train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt",
                                   tmp_path / "adapter", device="cpu")
    assert result.step == batches
    assert result.trained_tokens == sum(lengths)


def test_the_api_refuses_a_budget_it_cannot_honour() -> None:
    from api.jobs import _check_limits
    from shared.errors import LorafleetError
    from shared.schemas import JobCreate

    base = {"model": "org/m", "training_file": "file-x", "max_length": 512}
    _check_limits(JobCreate(**base, max_tokens_per_batch=4096))
    with pytest.raises(LorafleetError, match="at least max_length") as small:
        _check_limits(JobCreate(**base, max_tokens_per_batch=256))
    with pytest.raises(LorafleetError, match="needs packing") as padded:
        _check_limits(JobCreate(**base, max_tokens_per_batch=4096, packing=False))
    assert small.value.param == padded.value.param == "max_tokens_per_batch"
    # Specs stored before the option existed still load, with fixed batches.
    stored = spec().model_dump()
    stored.pop("max_tokens_per_batch")
    assert type(spec()).model_validate(stored).max_tokens_per_batch is None
