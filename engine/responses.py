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

from engine.logprobs import TokenLogprob, TokenText, chat_logprobs, completion_logprobs
from shared.errors import LorafleetError
from shared.ids import new_id

if TYPE_CHECKING:  # the vLLM gateway shapes answers without the generation stack
    from engine.batcher import Request
    from engine.decoding import Row

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_payload(exc: LorafleetError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}


@dataclass
class Choice:
    """What one choice of a response has gathered."""

    text: str = ""
    reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: str = ""  # echo: the prompt the text starts with
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Shaper:
    """Builds the objects of one response (``chat``: chat completion, else text completion).

    ``text_of`` (a token's text) is set when the request asked for logprobs; ``echo``: the
    answers start with their prompt.
    """

    model: str
    chat: bool
    choices: int
    text_of: TokenText | None = None
    echo: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict[int, int] = field(default_factory=dict)  # streamed text per choice

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

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if self.text_of is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.text_of)
        return completion_logprobs(entries, self.text_of, offset)

    def response(self, choices: list[Choice], prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        shaped = []
        for i, c in enumerate(choices):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text,
                                           "refusal": None}
                if c.tool_calls:
                    message.update(content=c.text or None, tool_calls=c.tool_calls)
                shaped.append({"index": i, "message": message,
                               "logprobs": self._logprobs(c.logprobs),
                               "finish_reason": c.reason})
            else:
                shaped.append({"index": i, "text": c.prompt + c.text,
                               "logprobs": self._logprobs(c.prompt_logprobs + c.logprobs),
                               "finish_reason": c.reason})
        body = self._envelope(self.object, shaped)
        body["usage"] = self.usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, index: int, text: str | None, reason: str | None = None,
              role: bool = False, logprobs: list[TokenLogprob] | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        shaped = None
        if self.text_of is not None and logprobs:
            offset = self._offsets.get(index, 0)
            shaped = self._logprobs(logprobs, offset)
            self._offsets[index] = offset + sum(len(self.text_of(e.token)) for e in logprobs)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": shaped,
                      "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = self.usage(prompt_tokens, completion_tokens)
        return body


def shaper_for(model: str, chat: bool, rows: list[Row], text_of: TokenText) -> Shaper:
    """The shaper of a response whose choices are ``rows``."""
    first = rows[0]
    return Shaper(model, chat, len(rows), text_of if first.logprobs is not None else None,
                  first.echo)


async def collect(request: Request, shaper: Shaper) -> dict[str, Any]:
    """Wait for the whole result; the response object.

    Raises:
        LorafleetError: generation failed.
    """
    choices = [Choice() for _ in range(shaper.choices)]
    for row in request.rows:
        choices[row.index].prompt = row.prompt_text
    completion = 0
    while True:
        event = await request.events.get()
        if event[0] == "prompt":
            choices[event[1]].prompt_logprobs = event[2]
        elif event[0] == "delta":
            choices[event[1]].text += event[2]
            choices[event[1]].logprobs += event[3]
        elif event[0] == "finish":
            choices[event[1]].reason = event[2]
            choices[event[1]].logprobs += event[4]
            completion += event[3]
        elif event[0] == "error":
            raise event[1]
        else:
            return shaper.response(choices, request.prompt_tokens, completion)


async def stream(request: Request, shaper: Shaper, include_usage: bool) -> AsyncIterator[str]:
    """The result as server-sent events, as it is generated."""
    if shaper.chat:
        for i in range(shaper.choices):
            yield sse(shaper.chunk(i, None, role=True))
    completion = 0
    while True:
        event = await request.events.get()
        if event[0] == "prompt":
            row = request.rows[event[1]]
            yield sse(shaper.chunk(event[1], row.prompt_text, logprobs=event[2]))
        elif event[0] == "delta":
            yield sse(shaper.chunk(event[1], event[2], logprobs=event[3]))
        elif event[0] == "finish":
            completion += event[3]
            yield sse(shaper.chunk(event[1], None, reason=event[2], logprobs=event[4]))
        elif event[0] == "error":
            # The status line is long gone: OpenAI's clients raise on an error event.
            yield sse(error_payload(event[1]))
            break
        else:
            if include_usage:
                yield sse(shaper.usage_chunk(request.prompt_tokens, completion))
            break
    yield DONE


async def replay(response: dict[str, Any], shaper: Shaper,
                 include_usage: bool) -> AsyncIterator[str]:
    """A whole chat completion as the chunks of a stream: per choice its role, its content
    (with its logprobs), its tool calls as the SDK's tool-call deltas (each call whole, with
    its index), and its ``finish_reason``."""
    for choice in response["choices"]:
        i, message = choice["index"], choice["message"]
        yield sse(shaper.chunk(i, None, role=True))
        if message.get("content"):
            body = shaper.chunk(i, message["content"])
            body["choices"][0]["logprobs"] = choice.get("logprobs")
            yield sse(body)
        calls = [{"index": j, **call} for j, call in enumerate(message.get("tool_calls") or [])]
        if calls:
            yield sse(shaper.chunk(i, None, tool_calls=calls))
        yield sse(shaper.chunk(i, None, reason=choice["finish_reason"]))
    if include_usage:
        usage = response["usage"]
        yield sse(shaper.usage_chunk(usage["prompt_tokens"], usage["completion_tokens"]))
    yield DONE
