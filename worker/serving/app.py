"""The engine's HTTP service (``lorafleet serve``): OpenAI-shaped completions for the API.

The API authenticates the caller and resolves ``model`` to a :class:`~shared.inference.Target`
(base model, adapter folder, prompt format); this service only generates. It has no keys of
its own, so it must listen on a private interface (default 127.0.0.1).

Request path: parse → tokenize and check in a worker thread (:meth:`Engine.submit`) → queue
(:class:`~worker.serving.batcher.Batcher`, 429 when full) → the generation thread runs it in a
mixed-adapter batch → text comes back as it is generated (SSE) or as one response.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shared import http_errors, storage
from shared.errors import InvalidRequest
from shared.inference import EngineChatRequest, EngineCompletionRequest
from shared.settings import Settings, get_settings
from worker.adapter_checks import check_adapter
from worker.serving import responses
from worker.serving.adapters import AdapterRef, adapter_ref
from worker.serving.batcher import Batcher, Request
from worker.serving.engine import BaseModelHost, pick_device
from worker.serving.prompts import Prepared, chat_prompt, completion_prompts, make_rows

log = logging.getLogger(__name__)

EngineRequest = EngineCompletionRequest | EngineChatRequest


class Engine:
    """Base models (one copy each), the batcher and its generation thread.

    Args:
        settings: batching, cache and limit settings.
        adapter_root: when set, adapters are only loaded from under this folder.
    """

    def __init__(self, settings: Settings, adapter_root: Path | None = None):
        self.settings = settings
        self.device = pick_device(settings.engine_device)
        self.adapter_root = adapter_root.resolve() if adapter_root else None
        self.batcher = Batcher(settings.batch_window_ms / 1000, settings.max_batch_size,
                               settings.max_queued_requests)
        self._hosts: dict[str, BaseModelHost] = {}
        self._hosts_lock = threading.Lock()
        self._checked: set[str] = set()  # adapter versions (AdapterRef.name) found safe

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def host(self, base_model: str) -> BaseModelHost:
        """The host of ``base_model``, created (tokenizer and config) on first use."""
        with self._hosts_lock:
            host = self._hosts.get(base_model)
            if host is None:
                host = BaseModelHost(base_model, self.device, self.settings.adapter_cache_count,
                                     self.settings.adapter_cache_bytes)
                self._hosts[base_model] = host
            return host

    def _adapter(self, path: str | None) -> AdapterRef | None:
        if path is None:
            return None
        if self.adapter_root is not None and not Path(path).resolve().is_relative_to(
                self.adapter_root):
            raise InvalidRequest("adapter_path is outside the storage folder", param="model")
        return adapter_ref(path)

    def prepare(self, body: EngineRequest) -> tuple[BaseModelHost, AdapterRef | None, Prepared]:
        """Tokenize and check a request (blocking: runs in a worker thread)."""
        target = body.target
        host = self.host(target.base_model)
        ref = self._adapter(target.adapter_path)
        if ref is not None and ref.name not in self._checked:
            check_adapter(ref.path, host.config)  # once per version, before it is loaded
            self._checked.add(ref.name)
        name = ref.name if ref else None
        if isinstance(body, EngineChatRequest):
            prompts = [chat_prompt(host, target, body)]
            param = "messages"
        else:
            prompts = completion_prompts(host, target, body)
            param = "prompt"
        return host, ref, make_rows(host, name, prompts, body, self.settings, param)

    async def submit(self, body: EngineRequest) -> Request:
        """Prepare and queue a request; its results arrive on ``request.events``.

        Raises:
            LorafleetError: a bad request (400), a missing adapter (404), a full queue (429).
        """
        host, ref, prepared = await asyncio.to_thread(self.prepare, body)
        request = Request(host, ref, prepared.rows, prepared.prompt_tokens,
                          loop=asyncio.get_running_loop())
        self.batcher.submit(request)
        return request

    def stats(self) -> dict[str, Any]:
        with self._hosts_lock:
            hosts = {name: h.stats() for name, h in self._hosts.items()}
        return {**self.batcher.stats(), "base_models": hosts}


async def _guarded(events: AsyncIterator[str], on_close: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for item in events:
            yield item
    finally:
        on_close()  # the client may have gone: stop generating for it


async def _disconnected(http: HTTPRequest) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)


async def run_request(engine: Engine, body: EngineRequest,
                      http: HTTPRequest | None = None) -> Any:
    """Submit ``body`` and answer with one response object or an event stream. A client that
    goes away (``http`` disconnects) stops the generation of its request."""
    request = await engine.submit(body)
    shaper = responses.Shaper(body.target.model, isinstance(body, EngineChatRequest),
                              len(request.rows))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = responses.stream(request, shaper, include_usage)
        return StreamingResponse(_guarded(events, lambda: engine.batcher.cancel(request)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = asyncio.ensure_future(responses.collect(request, shaper))
    watcher = asyncio.ensure_future(_disconnected(http)) if http is not None else None
    try:
        await asyncio.wait([t for t in (result, watcher) if t is not None],
                           return_when=asyncio.FIRST_COMPLETED)
        if not result.done():  # the client left: nobody reads the answer
            engine.batcher.cancel(request)
            result.cancel()
            return Response(status_code=499)
        return JSONResponse(result.result())
    except asyncio.CancelledError:
        engine.batcher.cancel(request)
        raise
    finally:
        for task in (result, watcher):
            if task is not None and not task.done():
                task.cancel()


def create_app(engine: Engine | None = None) -> FastAPI:
    """The engine service. Without ``engine``, one is built from the settings."""
    settings = get_settings()
    if engine is None:
        if settings.engine_nice and hasattr(os, "nice"):
            os.nice(settings.engine_nice)  # before any thread starts: they all inherit it
        if settings.engine_torch_threads:
            import torch

            torch.set_num_threads(settings.engine_torch_threads)
        engine = Engine(settings, adapter_root=storage.root())

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorafleet engine", version="0.1.0", lifespan=lifespan,
                  description="Generation with LoRA adapters; called by the lorafleet API.")
    http_errors.install(app)
    app.state.engine = engine

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Queue and model state."""
        return {"status": "ok", **engine.stats()}

    @app.post("/v1/completions")
    async def completions(body: EngineCompletionRequest, http: HTTPRequest) -> Any:
        """A text completion for a resolved target."""
        return await run_request(engine, body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: EngineChatRequest, http: HTTPRequest) -> Any:
        """A chat completion for a resolved target."""
        return await run_request(engine, body, http)

    return app
