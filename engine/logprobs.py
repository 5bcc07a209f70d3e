"""Token logprobs, as both engines compute them and as OpenAI shapes them.

An engine reports each token of a choice (and, for ``echo``, of its prompt) as a
:class:`TokenLogprob`: the token id, the log-softmax of the model's raw logits at that token
(before temperature, penalties or biases, as vLLM reports them), and the most likely tokens
there. :func:`completion_logprobs` and :func:`chat_logprobs` turn them into the ``logprobs``
objects of text completions and of chat completions.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# A token id -> its text (a special token's text too, e.g. "<|endoftext|>").
TokenText = Callable[[int], str]
# How vLLM names a token asked with ``return_tokens_as_token_ids``: "token_id:N".
_TOKEN_ID_AT = len("token_id:")
_LOGPROB = operator.itemgetter(1)


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its logprob (None: the first token of a prompt, which nothing predicts),
    with the ``top`` most likely tokens at its position, most likely first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def completion_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's text-completion ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (the most likely tokens and the token itself; None where the logprob is) and
    ``text_offset`` (each token's start in the choice's text, from ``offset``)."""
    # Once per token and per alternative of every answer: kept to plain loops over locals.
    tokens = [text_of(entry.token) for entry in entries]
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    for entry, text in zip(entries, tokens, strict=True):
        offsets.append(offset)
        offset += len(text)
        if entry.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in entry.top:  # most likely first: tokens of the same text keep the best
            top.setdefault(text_of(t), lp)
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    """OpenAI's chat-completion ``logprobs``: ``content``, one object per token with its
    ``top_logprobs``; ``refusal`` is always None."""
    content = []
    for entry in entries:
        item = _chat_token(text_of(entry.token), entry.logprob or 0.0)
        item["top_logprobs"] = [_chat_token(text_of(t), lp) for t, lp in entry.top]
        content.append(item)
    return {"content": content, "refusal": None}


def parse_vllm_completion(logprobs: dict[str, Any] | None, k: int) -> list[TokenLogprob]:
    """The generated tokens of one vLLM text-completion choice asked with
    ``return_tokens_as_token_ids`` (tokens as ``"token_id:N"``), keeping the ``k`` most
    likely alternatives (vLLM lists the token chosen first, then the most likely ones)."""
    if not logprobs:
        return []
    entries = []
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                   logprobs["top_logprobs"], strict=True):
        ranked = [(int(t[_TOKEN_ID_AT:]), lp) for t, lp in top.items()] if top else []
        ranked.sort(key=_LOGPROB, reverse=True)  # stable: equal ones keep vLLM's order
        entries.append(TokenLogprob(_token_id(token), logprob, tuple(ranked[:k])))
    return entries


def parse_vllm_prompt(prompt_ids: Sequence[int], prompt_logprobs: list[Any] | None,
                      k: int) -> list[TokenLogprob]:
    """The prompt tokens of one vLLM choice asked with ``prompt_logprobs`` (one dict of
    ``{"<id>": {"logprob", "rank", ...}}`` per position, None first)."""
    entries = []
    for token, scores in zip(prompt_ids, prompt_logprobs or [None] * len(prompt_ids),
                             strict=True):
        if not scores:
            entries.append(TokenLogprob(token, None))
            continue
        ranked = sorted(((int(t), v) for t, v in scores.items()),
                        key=lambda item: item[1].get("rank") or 1 << 30)
        top = tuple((t, float(v["logprob"])) for t, v in ranked if 1 <= (v.get("rank") or 0) <= k)
        entries.append(TokenLogprob(token, float(scores[str(token)]["logprob"]), top))
    return entries


def _token_id(token: str) -> int:
    return int(token[_TOKEN_ID_AT:])
