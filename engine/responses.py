"""OpenAI's response and stream-chunk shapes, for completions and chat completions.

A request's events (see :class:`engine.batcher.Request`) become either one response
object, or server-sent events: one chunk per piece of text, a last chunk per choice carrying
its ``finish_reason``, optionally a usage chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.errors import LorafleetError
from shared.ids import new_id

if TYPE_CHECKING:  # the vLLM gateway shapes answers without the generation stack
    from engine.batcher import Request

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_payload(exc: LorafleetError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}


@dataclass
class Shaper:
    """Builds the objects of one response (``chat``: chat completion, else text completion)."""

    model: str
    chat: bool
    choices: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def response(self, texts: list[str], reasons: list[str | None], prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t,
                                                "refusal": None},
                        "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        body = self._envelope(self.object, choices)
        body["usage"] = self.usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, index: int, text: str | None, reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = self.usage(prompt_tokens, completion_tokens)
        return body


async def collect(request: Request, shaper: Shaper) -> dict[str, Any]:
    """Wait for the whole result; the response object.

    Raises:
        LorafleetError: generation failed.
    """
    texts = [""] * shaper.choices
    reasons: list[str | None] = [None] * shaper.choices
    completion = 0
    while True:
        event = await request.events.get()
        if event[0] == "delta":
            texts[event[1]] += event[2]
        elif event[0] == "finish":
            reasons[event[1]] = event[2]
            completion += event[3]
        elif event[0] == "error":
            raise event[1]
        else:
            return shaper.response(texts, reasons, request.prompt_tokens, completion)


async def stream(request: Request, shaper: Shaper, include_usage: bool) -> AsyncIterator[str]:
    """The result as server-sent events, as it is generated."""
    if shaper.chat:
        for i in range(shaper.choices):
            yield sse(shaper.chunk(i, None, role=True))
    completion = 0
    while True:
        event = await request.events.get()
        if event[0] == "delta":
            yield sse(shaper.chunk(event[1], event[2]))
        elif event[0] == "finish":
            completion += event[3]
            yield sse(shaper.chunk(event[1], None, reason=event[2]))
        elif event[0] == "error":
            # The status line is long gone: OpenAI's clients raise on an error event.
            yield sse(error_payload(event[1]))
            break
        else:
            if include_usage:
                yield sse(shaper.usage_chunk(request.prompt_tokens, completion))
            break
    yield DONE
