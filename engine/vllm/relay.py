"""A prepared request as vLLM completions, and vLLM's answers in the engine's own shapes.

The gateway renders and tokenizes prompts itself (``engine.prompts``, as the built-in
engine does), so vLLM gets token ids on ``/v1/completions``, one request per prompt, whatever
the client called: its answers are then shaped by :class:`~engine.responses.Shaper`
into the very objects and stream chunks the built-in engine produces, ``model`` being the name
the client asked for.

Two differences of vLLM are absorbed here: it refuses ``n > 1`` for greedy requests (one
choice is generated and copied, as greedy choices are equal anyway), and it counts the stop
token that ended a choice in ``completion_tokens`` (the built-in engine does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from engine import responses
from engine.decoding import Row
from engine.errors import GenerationFailed
from engine.logprobs import parse_vllm_completion, parse_vllm_prompt
from engine.prompts import Prepared
from engine.responses import Choice
from shared.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    LorafleetError,
    Overloaded,
    ServiceUnavailable,
)
from shared.inference import SamplingRequest


class UnknownModel(LorafleetError):
    """vLLM does not know the lora name (an external server that restarted): load it again."""

    status = 404


@dataclass
class Upstream:
    """One vLLM request: the choices of one prompt."""

    payload: dict[str, Any]
    first: int  # the response index of its first choice
    copies: int  # how many response choices each vLLM choice fills (greedy n > 1)
    row: Row  # the first of its rows (they differ by seed only)
    tokens: dict[int, list[int]] = field(default_factory=dict)  # vLLM index -> token ids
    done: bool = False

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.row.stop_ids

    @property
    def score_only(self) -> bool:
        """``max_tokens: 0`` with echo: vLLM generates one token, which nobody sees."""
        return self.row.max_new_tokens == 0

    def indexes(self, index: int) -> range:
        start = self.first + index * self.copies
        return range(start, start + self.copies)


def plan(prepared: Prepared, req: SamplingRequest, model: str, stream: bool,
         structured_outputs: dict[str, Any] | None = None) -> list[Upstream]:
    """One vLLM ``/v1/completions`` payload per prompt of ``prepared`` (its rows are grouped by
    prompt, ``req.choices`` rows each).

    Logprobs come back with token ids (``return_tokens_as_token_ids``), and an echoed
    prompt's as ``prompt_logprobs``: the answer's text and tokens are shaped here, as the
    built-in engine shapes them.
    """
    n = req.choices
    upstreams = []
    for first in range(0, len(prepared.rows), n):
        row = prepared.rows[first]
        greedy = row.temperature == 0
        payload: dict[str, Any] = {
            "model": model, "prompt": row.prompt_ids, "n": 1 if greedy else n,
            "max_tokens": row.max_new_tokens or 1, "temperature": row.temperature,
            "top_p": row.top_p,
            # Neutral values for what the built-in engine does not do, whatever the server's
            # defaults are.
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": row.presence_penalty,
            "frequency_penalty": row.frequency_penalty,
            "stop": row.stops, "stop_token_ids": sorted(row.stop_ids),
            "skip_special_tokens": True, "return_token_ids": True, "stream": stream,
        }
        if row.logit_bias:
            payload["logit_bias"] = {str(t): b for t, b in row.logit_bias.items()}
        if row.logprobs is not None:
            payload.update(logprobs=row.logprobs, return_tokens_as_token_ids=True)
            if row.echo:
                payload["prompt_logprobs"] = row.logprobs
        if structured_outputs is not None:
            payload["structured_outputs"] = structured_outputs
        if req.seed is not None:
            payload["seed"] = (req.seed + first) % 2**63
        upstreams.append(Upstream(payload, first, n if greedy else 1, row))
    return upstreams


def _choice(upstream: Upstream, choice: dict[str, Any]) -> Choice:
    """One vLLM choice (of a whole answer) as the engine's."""
    row = upstream.row
    k = row.logprobs
    if upstream.score_only:
        shaped = Choice(reason="length", prompt=row.prompt_text)
    else:
        shaped = Choice(choice["text"], choice["finish_reason"], prompt=row.prompt_text,
                        logprobs=parse_vllm_completion(choice.get("logprobs"), k or 0)
                        if k is not None else [])
    if row.echo and k is not None:
        shaped.prompt_logprobs = parse_vllm_prompt(row.prompt_ids, choice.get("prompt_logprobs"),
                                                   k)
    return shaped


def completion_tokens(upstream: Upstream, index: int, finish_reason: str | None,
                      stop_reason: Any) -> int:
    """Tokens of a finished choice as the built-in engine counts them: without the stop token
    that ended it (vLLM keeps it in ``token_ids``; a stop *string* has ``stop_reason`` str)."""
    ids = upstream.tokens.get(index, [])
    if (finish_reason == "stop" and not isinstance(stop_reason, str) and ids
            and ids[-1] in upstream.stop_ids):
        return len(ids) - 1
    return len(ids)


def error_of(status: int, body: bytes) -> LorafleetError:
    """vLLM's error answer as the error the built-in engine would raise."""
    try:
        error = json.loads(body).get("error")
        message = str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:500]
    if status == 404:
        return UnknownModel(message)
    if status == 429:
        return Overloaded(f"The inference engine is busy: {message}")
    if status in (502, 503, 504):
        return ServiceUnavailable(f"The inference engine is unavailable: {message}")
    if 400 <= status < 500:
        if "context length" in message or "maximum context" in message:
            return ContextLengthExceeded(message, param="max_tokens")
        return InvalidRequest(message)
    return GenerationFailed(f"generation failed on vLLM ({status}): {message}")


async def collect(client: httpx.AsyncClient, url: str, upstreams: list[Upstream],
                  shaper: responses.Shaper, prompt_tokens: int,
                  finish: Callable[[Choice], None] = lambda choice: None) -> dict[str, Any]:
    """Run the upstream requests at once; the whole response object (each choice passed to
    ``finish`` before it is shaped: tool calls are read there).

    Raises:
        LorafleetError: vLLM refused or failed a request.
        httpx.TransportError: the server went away.
    """
    answers = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=u.payload)
                                     for u in upstreams))
    choices = [Choice() for _ in range(shaper.choices)]
    completion = 0
    for upstream, answer in zip(upstreams, answers, strict=True):
        if answer.status_code != 200:
            raise error_of(answer.status_code, answer.content)
        for choice in answer.json()["choices"]:
            index = choice["index"]
            upstream.tokens[index] = [] if upstream.score_only else list(
                choice.get("token_ids") or [])
            used = completion_tokens(upstream, index, choice["finish_reason"],
                                     choice.get("stop_reason"))
            shaped = _choice(upstream, choice)
            finish(shaped)
            for i in upstream.indexes(index):
                choices[i] = shaped
                completion += used
        upstream.done = True
    return shaper.response(choices, prompt_tokens, completion)


async def open_streams(client: httpx.AsyncClient, url: str,
                       upstreams: list[Upstream]) -> list[httpx.Response]:
    """Start the streamed upstream requests; all of them answered 200 when this returns.

    Raises:
        LorafleetError: vLLM refused one (the others are closed).
        httpx.TransportError: the server went away.
    """
    opened: list[httpx.Response] = []
    try:
        for upstream in upstreams:
            answer = await client.send(
                client.build_request("POST", f"{url}/v1/completions", json=upstream.payload),
                stream=True)
            opened.append(answer)
            if answer.status_code != 200:
                raise error_of(answer.status_code, await answer.aread())
    except BaseException:
        await close_all(opened)
        raise
    return opened


async def close_all(answers: list[httpx.Response]) -> None:
    # Shielded: also when the client went away (this task is being cancelled). Closing a
    # stream vLLM still writes is what makes it abort the request.
    with anyio.CancelScope(shield=True):
        for answer in answers:
            with contextlib.suppress(Exception):
                await answer.aclose()


async def _events(answer: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in answer.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def stream(upstreams: list[Upstream], answers: list[httpx.Response],
                 shaper: responses.Shaper, prompt_tokens: int,
                 include_usage: bool) -> AsyncGenerator[str, None]:
    """vLLM's streams, merged into one as the built-in engine streams: a role chunk per choice
    (chat), text chunks, one closing chunk per choice with its ``finish_reason``, the usage
    chunk if asked, then ``data: [DONE]``."""
    queue: asyncio.Queue[tuple[Upstream, dict[str, Any] | None | BaseException]] = (
        asyncio.Queue())

    async def read(upstream: Upstream, answer: httpx.Response) -> None:
        try:
            async for event in _events(answer):
                await queue.put((upstream, event))
            await queue.put((upstream, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it
            await queue.put((upstream, e))

    readers = [asyncio.ensure_future(read(u, a)) for u, a in zip(upstreams, answers, strict=True)]
    try:
        if shaper.chat:
            for i in range(shaper.choices):
                yield responses.sse(shaper.chunk(i, None, role=True))
        for upstream in upstreams:
            if upstream.row.echo:
                for index in range(upstream.payload["n"]):
                    for i in upstream.indexes(index):
                        yield responses.sse(shaper.chunk(i, upstream.row.prompt_text))
        completion = 0
        open_count = len(upstreams)
        while open_count:
            upstream, event = await queue.get()
            if event is None:
                upstream.done = True
                open_count -= 1
                continue
            if isinstance(event, BaseException) or "error" in event:
                yield responses.sse(responses.error_payload(_stream_error(event)))
                break
            for choice in event.get("choices", []):
                index = choice["index"]
                reason = choice.get("finish_reason")
                if upstream.score_only:  # the one token generated is nobody's
                    choice = {"index": index, "text": "", "finish_reason": reason and "length"}
                upstream.tokens.setdefault(index, []).extend(choice.get("token_ids") or [])
                k = upstream.row.logprobs
                entries = parse_vllm_completion(choice.get("logprobs"), k or 0) if (
                    k is not None) else []
                if choice.get("text") or entries:
                    for i in upstream.indexes(index):
                        yield responses.sse(shaper.chunk(i, choice.get("text"),
                                                         logprobs=entries))
                reason = choice.get("finish_reason")
                if reason is not None:
                    used = completion_tokens(upstream, index, reason, choice.get("stop_reason"))
                    for i in upstream.indexes(index):
                        completion += used
                        yield responses.sse(shaper.chunk(i, None, reason=reason))
        else:
            if include_usage:
                yield responses.sse(shaper.usage_chunk(prompt_tokens, completion))
        yield responses.DONE
    finally:
        for reader in readers:
            reader.cancel()
        await close_all(answers)


def _stream_error(event: dict[str, Any] | BaseException) -> LorafleetError:
    if isinstance(event, httpx.TransportError):
        return ServiceUnavailable("The vLLM server closed the stream.")
    if isinstance(event, BaseException):
        return GenerationFailed(f"generation failed: {type(event).__name__}")
    error = event.get("error")
    message = error.get("message") if isinstance(error, dict) else str(error)
    return GenerationFailed(f"generation failed on vLLM: {message}")
