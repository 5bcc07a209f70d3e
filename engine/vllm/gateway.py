"""The engine on vLLM: the same protocol as the built-in engine, generation on vLLM servers.

Request path: parse → render and tokenize the prompt in the adapter's format and check it
(:mod:`engine.prompts`, in a worker thread, with the tokenizer and config only) → the
base model's vLLM server (started on demand, :mod:`~engine.vllm.servers`) → the adapter
loaded there and its parity probe checked, once per version (:mod:`~engine.vllm.lora`)
→ 429 if the server has ``max_queued_requests`` in flight → vLLM ``/v1/completions`` on token
ids → its answer in the built-in engine's shapes (:mod:`~engine.vllm.relay`), streams
relayed chunk by chunk. A client that goes away closes its vLLM request, which aborts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import responses, tools
from engine.adapter_folders import AdapterFolders
from engine.adapters import AdapterRef, served_adapter, taught_tool_format
from engine.prompts import Prepared, chat_prompt, completion_prompts, make_rows
from engine.responses import Choice
from engine.vllm import relay
from engine.vllm.lora import Loras, check_rank
from engine.vllm.servers import ServerManager, VllmServer
from modelio.adapter_checks import check_adapter
from modelio.model_text import ModelText
from shared.errors import InvalidRequest, ServiceUnavailable
from shared.http import internal_client, unless_gone
from shared.inference import EngineChatRequest, EngineCompletionRequest
from shared.settings import Settings

log = logging.getLogger(__name__)

EngineRequest = EngineCompletionRequest | EngineChatRequest


class VllmEngine:
    """Base models' tokenizers, their vLLM servers and the adapters loaded on them.

    Args:
        settings: the engine's and the ``vllm_*`` settings.
        python: the vLLM environment's Python (None: only ``vllm_servers``).
        log_dir: where managed vLLM servers log.
        adapters: where adapters come from (storage URLs fetched to the node's cache);
            None: adapter paths are local folders.
        cpu: whether vLLM runs on the CPU.
    """

    def __init__(self, settings: Settings, python: str | None, log_dir: Path,
                 adapters: AdapterFolders | None = None, cpu: bool = True):
        self.settings = settings
        self.adapters = adapters
        self.client = internal_client(settings.engine_timeout_seconds)
        self.servers = ServerManager(settings, python, log_dir, self.client, cpu)
        self.loras = Loras(settings, self.client)
        self._texts: dict[str, ModelText] = {}
        self._texts_lock = threading.Lock()
        # Adapter versions found safe, and their LoRA rank.
        self._adapter_ranks: dict[str, int] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.reason = "vLLM was asked for"  # why this backend serves
        self.answered = 0
        self.rows = 0
        self.rows_cancelled = 0

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.servers.stop_all()
        await self.client.aclose()

    async def _reap(self) -> None:
        interval = min(10.0, self.settings.vllm_idle_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.servers.stop_idle()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad stop
                log.exception("stopping idle vLLM servers failed")

    # ------------------------------------------------------------------ requests
    def text(self, base_model: str) -> ModelText:
        """The tokenizer and config of ``base_model`` (loaded on first use)."""
        with self._texts_lock:
            text = self._texts.get(base_model)
            if text is None:
                text = ModelText(base_model, max_context=self.settings.vllm_max_model_len)
                self._texts[base_model] = text
            return text

    def prepare(self, body: EngineRequest
                ) -> tuple[ModelText, AdapterRef | None, int, Prepared]:
        """Tokenize and check a request (blocking: runs in a worker thread).

        Raises:
            LorafleetError: a bad request or adapter (4xx), as the built-in engine raises them.
        """
        target = body.target
        text = self.text(target.base_model)
        ref = served_adapter(target.adapter_path, self.adapters)
        rank = 0
        if ref is not None:
            if ref.name not in self._adapter_ranks:
                check_adapter(ref.path, text.config)  # once per version, before it is loaded
                self._adapter_ranks[ref.name] = check_rank(ref, self.servers.max_lora_rank)
            rank = self._adapter_ranks[ref.name]
        if body.stream and body.echo_prompt and body.top_logprobs_count is not None:
            raise InvalidRequest("echo with logprobs cannot be streamed on vLLM (it scores "
                                 "prompts for whole answers only): send stream: false",
                                 param="echo")
        if isinstance(body, EngineChatRequest):
            prompts = [chat_prompt(text, target, body, taught_tool_format(ref))]
            param = "messages"
        else:
            prompts = completion_prompts(text, target, body)
            param = "prompt"
        name = ref.name if ref else None
        return text, ref, rank, make_rows(text, name, prompts, body, self.settings, param)

    async def answer(self, body: EngineRequest, http: HTTPRequest | None = None) -> Any:
        """One response object or an event stream for ``body``.

        Raises:
            LorafleetError: a bad request (4xx), a refused adapter (422), a busy server (429),
                a vLLM server that died or does not start (503).
        """
        text, ref, rank, prepared = await asyncio.to_thread(self.prepare, body)
        for attempt in range(2):
            server = await self.servers.get(text, rank)
            server.pending += 1  # a server replaced meanwhile stops only once this is sent
            try:
                model = await self.loras.ensure(server, ref, text) if ref else server.served_name
                return await self._generate(server, model, body, prepared, http)
            except relay.UnknownModel:
                if attempt or ref is None:
                    raise
                # The server lost its adapters (an external server restarted): load again.
                server.adapters.clear()
            finally:
                server.pending -= 1
        raise AssertionError("unreachable")

    async def _generate(self, server: VllmServer, model: str, body: EngineRequest,
                        prepared: Prepared, http: HTTPRequest | None) -> Any:
        chat = isinstance(body, EngineChatRequest)
        constraint = tools.structured_outputs(body) if isinstance(body, EngineChatRequest) else None
        # A reply that may be tool calls is read whole, then streamed as the SDK's deltas.
        whole = isinstance(body, EngineChatRequest) and body.calls_tools
        upstreams = relay.plan(prepared, body, model, bool(body.stream) and not whole,
                               constraint)
        shaper = responses.shaper_for(body.target.model, chat, prepared.rows,
                                      self.text(body.target.base_model).token_text)
        release = server.admit(self.settings.max_queued_requests)
        streaming = False
        try:
            if body.stream and whole:
                answer = await self._collect(server, upstreams, shaper, prepared, http, body)
                if answer.status_code != 200:
                    return answer
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    responses.replay(json.loads(bytes(answer.body)), shaper, include_usage),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            if body.stream:
                opened = await unless_gone(self._upstream(server, relay.open_streams(
                    self.client, server.url, upstreams)), http)
                if opened is None:  # the client left before vLLM answered (streams closed)
                    self._cancelled(upstreams)
                    return Response(status_code=499)
                answers = opened[0]
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = relay.stream(upstreams, answers, shaper, prepared.prompt_tokens,
                                      include_usage)
                stream = self._tracked(events, upstreams, release)
                streaming = True  # the stream ends its admission when it ends
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await self._collect(server, upstreams, shaper, prepared, http, body)
        finally:
            if not streaming:
                release()

    async def _collect(self, server: VllmServer, upstreams: list[relay.Upstream],
                       shaper: responses.Shaper, prepared: Prepared,
                       http: HTTPRequest | None, body: EngineRequest) -> Response:
        def finish(choice: Choice) -> None:
            if not isinstance(body, EngineChatRequest):
                return
            content, calls = tools.parse_reply(choice.text, body)
            if calls:
                choice.text, choice.tool_calls, choice.reason = content or "", calls, "tool_calls"

        try:
            done = await unless_gone(self._upstream(server, relay.collect(
                self.client, server.url, upstreams, shaper, prepared.prompt_tokens, finish)),
                http)
        except asyncio.CancelledError:
            self._cancelled(upstreams)
            raise
        if done is None:  # the client left: closing the requests aborted them
            self._cancelled(upstreams)
            return Response(status_code=499)
        self._finished(upstreams)
        return JSONResponse(done[0])

    async def _upstream(self, server: VllmServer, call: Any) -> Any:
        """Await a call to ``server``; a transport error is the server's death or absence."""
        try:
            return await call
        except httpx.TransportError as e:
            if await server.gone(e):
                raise server.death() from e
            raise ServiceUnavailable(
                f"The vLLM server of {server.base_model} at {server.url} does not answer: "
                f"{e!r}") from e

    async def _tracked(self, events: AsyncGenerator[str, None], upstreams: list[relay.Upstream],
                       release: Callable[[], None]) -> AsyncIterator[str]:
        try:
            async for item in events:
                yield item
        finally:
            # Closed early (the client left): closing the relay closes the vLLM streams.
            with anyio.CancelScope(shield=True):
                await events.aclose()
            release()
            if all(u.done for u in upstreams):
                self._finished(upstreams)
            else:
                self._cancelled(upstreams)

    def _finished(self, upstreams: list[relay.Upstream]) -> None:
        self.answered += 1
        self.rows += sum(len(u.tokens) * u.copies for u in upstreams)

    def _cancelled(self, upstreams: list[relay.Upstream]) -> None:
        self.rows_cancelled += sum(u.payload["n"] for u in upstreams if not u.done)

    # ------------------------------------------------------------------ state
    def stats(self) -> dict[str, Any]:
        servers = list(self.servers)
        in_flight = sum(s.in_flight for s in servers)
        with self._texts_lock:
            texts = dict(self._texts)
        base_models: dict[str, Any] = {}
        for name, text in texts.items():
            server = next((s for s in servers if s.base_model == name), None)
            base_models[name] = {"loaded": False, "context_length": text.context_length,
                                 "adapters": 0, "adapter_loads": 0,
                                 **(server.stats() if server else {})}
        return {"backend": "vllm", "backend_reason": self.reason, "queued": in_flight,
                "busy": in_flight > 0,
                "requests": self.answered, "rows": self.rows,
                "rows_cancelled": self.rows_cancelled, "server_starts": self.servers.starts,
                "rank_restarts": self.servers.rank_restarts,
                "parity_checks": self.loras.parity_checks,
                "adapters_refused": len(self.loras.refused), "base_models": base_models}
