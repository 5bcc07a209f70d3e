"""Per-sequence decoding inside one batched ``generate`` call.

``generate`` applies one sampling setup and one set of stop conditions to a whole batch, but
the rows of a batch come from different requests. So sampling and stopping are ours, per row:

* :class:`RowSampler` (a logits processor) samples each sampled row with its own seeded
  generator and masks every other token, so that ``generate`` runs greedy and simply takes
  that token; greedy rows are left alone. A request's sampled text then depends on its seed,
  not on which requests shared its batch.
* :class:`RowStopper` (a stopping criterion) decodes each row as it grows, streams the new
  text, and ends the row at its own stop strings, stop tokens or token budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from engine.logprobs import TokenLogprob

# Text is streamed only once it is certain: a decoded tail that ends in a partial UTF-8
# character, or that could be the start of a stop string, is held back.
REPLACEMENT_CHAR = "\ufffd"
# The adapter name of a row for the bare base model (peft's name for it in mixed batches).
BASE = "__base__"

# (row, text delta) and (row, finish_reason) callbacks, called on the generation thread.
DeltaFn = Callable[["Row", str], None]
FinishFn = Callable[["Row"], None]
PromptFn = Callable[["Row", list[TokenLogprob]], None]


@dataclass(eq=False)
class Row:
    """One sequence of a batch: one choice of one prompt of one request."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str  # the peft adapter name, or "__base__"
    stops: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0  # the choice index in the response
    logprobs: int | None = None  # alternatives per token's logprobs; None: no logprobs
    echo: bool = False  # the prompt's tokens and their logprobs come back
    prompt_text: str = ""  # with echo: the prompt as the answer starts with it
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    owner: Any = None  # the request it belongs to
    # --- state while generating -------------------------------------------------------
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    logprob_entries: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0
    _step_logprobs: torch.Tensor | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens generated since the last call."""
        entries = self.logprob_entries[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprob_entries)
        return entries

    def record(self, token: int) -> None:
        """Note the logprob of the token just generated (if logprobs were asked)."""
        if self.logprobs is None or self._step_logprobs is None:
            return
        self.logprob_entries.append(entry(token, self._step_logprobs, self.logprobs))
        self._step_logprobs = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


def entry(token: int, logprobs: torch.Tensor, k: int) -> TokenLogprob:
    """``token`` at a position whose log-softmax is ``logprobs``, with the ``k`` most likely."""
    top = torch.topk(logprobs, k) if k else None
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if (
        top is not None) else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class RowSampler(LogitsProcessor):
    """Each row's logprobs (of the raw logits), logit biases and penalties, then temperature
    and top-p sampling, with each row's own generator."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            if row.logprobs is not None:
                row._step_logprobs = torch.log_softmax(scores[i].float(), dim=-1)
            _adjust(row, scores[i])
            if row.greedy:
                continue
            logits = scores[i].float() / row.temperature
            probs = torch.softmax(logits, dim=-1)
            if row.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest set whose mass reaches top_p (always the top token).
                drop = sorted_probs.cumsum(-1) - sorted_probs > row.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            token = torch.multinomial(probs, 1, generator=row.generator(probs.device))
            masked = torch.full_like(scores[i], float("-inf"))
            masked[token] = 0.0
            scores[i] = masked
        return scores


def _adjust(row: Row, scores: torch.Tensor) -> None:
    """OpenAI's logit bias, then its presence and frequency penalties (on the tokens this row
    generated so far), in place."""
    for token, bias in row.logit_bias.items():
        scores[token] += bias
    if row.generated and (row.presence_penalty or row.frequency_penalty):
        counts = torch.bincount(torch.tensor(row.generated, device=scores.device),
                                minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
        scores -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0)


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms and reports the text it adds, step by step."""

    def __init__(self, rows: list[Row], tokenizer: Any, on_delta: DeltaFn, on_finish: FinishFn,
                 cancelled: Callable[[Row], bool] = lambda row: False):
        self.rows = rows
        self.tokenizer = tokenizer
        self.on_delta = on_delta
        self.on_finish = on_finish
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,  # type: ignore[override]
                 **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last, strict=True):
            if row.done:
                continue
            if self.cancelled(row):
                row.finish_reason = "cancelled"
                continue
            row.record(token)  # the stop token too: it was generated, and scored
            if token in row.stop_ids:
                self._finish(row, "stop", row.text)
                continue
            row.generated.append(token)
            self._advance(row)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)

    def _advance(self, row: Row) -> None:
        row.text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        cut = min((p for p in (row.text.find(s, max(0, row.emitted - len(s)))
                               for s in row.stops) if p >= 0), default=-1)
        if cut >= 0:
            self._finish(row, "stop", row.text[:cut])
            return
        if len(row.generated) >= row.max_new_tokens:
            self._finish(row, "length", row.text)
            return
        safe = len(row.text) - _held_back(row.text, row.stops)
        while safe > row.emitted and row.text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        if safe > row.emitted:
            self.on_delta(row, row.text[row.emitted:safe])
            row.emitted = safe

    def _finish(self, row: Row, reason: str, final_text: str) -> None:
        row.text = final_text
        if len(final_text) > row.emitted:
            self.on_delta(row, final_text[row.emitted:])
            row.emitted = len(final_text)
        row.finish_reason = reason
        self.on_finish(row)

    def finish_all(self) -> None:
        """Close the rows that ``generate`` ended without us (its own length limit)."""
        for row in self.rows:
            if not row.done:
                self._finish(row, "length", row.text)
