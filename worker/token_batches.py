"""Token-budget batches: each batch holds as many examples as fit in ``max_tokens_per_batch``
tokens, instead of a fixed number of examples.

A packed row costs what its tokens cost, so a fixed count of examples makes steps of very
different sizes and, with short examples, steps too small to keep a large GPU busy. Here every
step carries about the same number of tokens.

The batches are a function of the seed and the epoch alone: the examples are shuffled once
with the seed and laid greedily into batches, and each epoch visits those batches in an order
drawn from ``seed + epoch``. The Trainer resumes a run by skipping the batches the checkpoint
had trained, so a resumed run sees exactly the batches of an uninterrupted one. The number of
batches is the same in every epoch, which the Trainer's step count relies on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

# The budget of a job that set neither ``batch_size`` nor ``max_tokens_per_batch``, on a
# CUDA worker: 16 k tokens keeps a large GPU's matrix units busy with a LoRA on a 2-8 B model,
# and its activations fit in well under 40 GB with ``max_length`` 2048 or less.
CUDA_DEFAULT_TOKENS = 16384


def token_budget(setting: int | str | None, device: str, max_length: int) -> int | None:
    """The job's budget on ``device``: the number it set; for ``"auto"`` (set neither batch
    size nor budget) :data:`CUDA_DEFAULT_TOKENS` on CUDA and None elsewhere (fixed batches of
    ``batch_size``); None when unset. Never below ``max_length``: every example must fit."""
    if setting == "auto":
        return max(CUDA_DEFAULT_TOKENS, max_length) if device.startswith("cuda") else None
    if setting is None:
        return None
    return int(setting)


def pack(lengths: Sequence[int], budget: int, seed: int) -> list[list[int]]:
    """Indices of the examples, shuffled with ``seed``, cut into batches of at most ``budget``
    tokens (an example longer than the budget alone in its batch)."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        if current and tokens + lengths[i] > budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of at most ``budget`` tokens, deterministic in ``seed`` and the epoch
    (:meth:`set_epoch`, which the Trainer calls at the start of every epoch)."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int):
        if budget < 1:
            raise ValueError(f"max_tokens_per_batch must be positive, not {budget}")
        self.batches = pack(lengths, budget, seed)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for b in torch.randperm(len(self.batches), generator=g).tolist():
            yield list(self.batches[b])
