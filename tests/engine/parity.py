"""Checks that served logprobs equal what transformers + peft compute for the same tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TOLERANCE = 1e-3  # float32 on the CPU (README, "Inference")


def close(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        abs(a - b) < TOLERANCE for a, b in zip(got, expected, strict=True))


def assert_completion_parity(logprobs: dict[str, Any], ids: list[int],
                             score: Callable[[list[int]], Any], k: int) -> None:
    """A text completion's ``logprobs`` with echo, over ``ids`` (prompt then completion),
    equal the reference's: the first is None, each other is the log-softmax at the position
    before it, and the ``k`` most likely alternatives are the reference's."""
    reference = score(ids)
    values = logprobs["token_logprobs"]
    assert len(values) == len(ids) and values[0] is None
    assert logprobs["top_logprobs"][0] is None
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert close(values[1:], expected), list(zip(values[1:], expected, strict=True))
    for i in range(1, len(ids)):
        # Keyed by text, as OpenAI's: tokens that read alike share one key (the best).
        best = sorted(reference[i - 1].tolist(), reverse=True)[:k]
        top = sorted(logprobs["top_logprobs"][i].values(), reverse=True)
        assert abs(top[0] - best[0]) < TOLERANCE
        assert all(min(abs(v - b) for b in [*best, expected[i - 1]]) < TOLERANCE for v in top)


def assert_chat_parity(logprobs: dict[str, Any], prompt_ids: list[int], reply_ids: list[int],
                       score: Callable[[list[int]], Any], k: int) -> None:
    """A chat completion's ``logprobs`` of the reply ``reply_ids`` after ``prompt_ids``."""
    reference = score(prompt_ids + reply_ids)
    content = logprobs["content"]
    assert len(content) == len(reply_ids)
    at = len(prompt_ids) - 1
    expected = [float(reference[at + i, t]) for i, t in enumerate(reply_ids)]
    assert close([c["logprob"] for c in content], expected)
    for i, c in enumerate(content):
        best = sorted(reference[at + i].tolist(), reverse=True)[:k]
        assert close([t["logprob"] for t in c["top_logprobs"]], best)
        assert c["bytes"] == list(c["token"].encode())
