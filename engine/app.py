"""The engine's HTTP service (``lorafleet serve``): OpenAI-shaped completions for the API.

The API authenticates the caller and resolves ``model`` to a :class:`~shared.inference.Target`
(base model, adapter folder, prompt format); this service only generates. It has no keys of
its own, so it must listen on a private interface (default 127.0.0.1).

Two backends speak this protocol alike, so the API cannot tell them apart
(``LORAFLEET_ENGINE_BACKEND``):

* vLLM (:mod:`engine.vllm`): one vLLM server per base model in use, with continuous
  batching and runtime adapter loading; chosen by ``auto`` wherever a vLLM environment exists.
* built-in (:class:`Engine`): peft's mixed-adapter batches in this process, for hosts where
  vLLM does not install. Request path: parse → tokenize and check in a worker thread
  (:meth:`Engine.submit`) → queue (:class:`~engine.batcher.Batcher`, 429 when full) →
  the generation thread runs it in a mixed-adapter batch → text comes back as it is generated
  (SSE) or as one response.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import responses
from engine.adapter_folders import AdapterFolders
from engine.adapters import AdapterRef, served_adapter, taught_tool_format
from engine.batcher import Batcher, Request
from engine.builtin import BaseModelHost, pick_device
from engine.prompts import Prepared, chat_prompt, completion_prompts, make_rows
from engine.vllm.gateway import VllmEngine
from engine.vllm.servers import find_vllm_python
from modelio.adapter_checks import check_adapter
from shared import http_errors, storage
from shared.http import unless_gone
from shared.inference import EngineChatRequest, EngineCompletionRequest
from shared.request_fields import UnsupportedParameter
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

EngineRequest = EngineCompletionRequest | EngineChatRequest


class Backend(Protocol):
    """What the service needs of an engine."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def answer(self, body: EngineRequest, http: HTTPRequest | None = None) -> Any: ...

    def stats(self) -> dict[str, Any]: ...


class Engine:
    """Base models (one copy each), the batcher and its generation thread.

    Args:
        settings: batching, cache and limit settings.
        adapters: where adapters come from (storage URLs fetched to the node's cache);
            None: adapter paths are local folders.
    """

    def __init__(self, settings: Settings, adapters: AdapterFolders | None = None):
        self.settings = settings
        self.device = pick_device(settings.engine_device)
        self.adapters = adapters
        self.batcher = Batcher(settings.batch_window_ms / 1000, settings.max_batch_size,
                               settings.max_queued_requests)
        self._hosts: dict[str, BaseModelHost] = {}
        self._hosts_lock = threading.Lock()
        self._checked: set[str] = set()  # adapter versions (AdapterRef.name) found safe
        self.reason = "the built-in engine was asked for"  # why this backend serves

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    async def open(self) -> None:
        self.start()

    async def close(self) -> None:
        self.stop()

    async def answer(self, body: EngineRequest, http: HTTPRequest | None = None) -> Any:
        return await run_request(self, body, http)

    def host(self, base_model: str) -> BaseModelHost:
        """The host of ``base_model``, created (tokenizer and config) on first use."""
        with self._hosts_lock:
            host = self._hosts.get(base_model)
            if host is None:
                host = BaseModelHost(base_model, self.device, self.settings.adapter_cache_count,
                                     self.settings.adapter_cache_bytes)
                self._hosts[base_model] = host
            return host

    def prepare(self, body: EngineRequest) -> tuple[BaseModelHost, AdapterRef | None, Prepared]:
        """Tokenize and check a request (blocking: runs in a worker thread).

        Raises:
            UnsupportedParameter: tools or structured outputs, which need vLLM.
        """
        target = body.target
        if isinstance(body, EngineChatRequest):
            refuse_without_vllm(body, self.reason)
        host = self.host(target.base_model)
        ref = served_adapter(target.adapter_path, self.adapters)
        if ref is not None and ref.name not in self._checked:
            check_adapter(ref.path, host.config)  # once per version, before it is loaded
            self._checked.add(ref.name)
        name = ref.name if ref else None
        if isinstance(body, EngineChatRequest):
            prompts = [chat_prompt(host, target, body, taught_tool_format(ref))]
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
        return {"backend": "builtin", "backend_reason": self.reason, **self.batcher.stats(),
                "base_models": hosts}


def refuse_without_vllm(body: EngineChatRequest, why: str) -> None:
    """The built-in engine generates free text only: tools and structured outputs, which
    need vLLM's constrained decoding and tool parsing, are refused by name."""
    fields = [name for name, asked in (
        ("tools", body.calls_tools),
        ("response_format", body.response_format is not None
         and body.response_format.type != "text")) if asked]
    if fields:
        raise UnsupportedParameter(
            f"'{fields[0]}' is not supported by the built-in engine, which serves here "
            f"because {why}: tools and structured outputs need vLLM", param=fields[0])


async def _guarded(events: AsyncIterator[str], on_close: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for item in events:
            yield item
    finally:
        on_close()  # the client may have gone: stop generating for it


async def run_request(engine: Engine, body: EngineRequest,
                      http: HTTPRequest | None = None) -> Any:
    """Submit ``body`` and answer with one response object or an event stream. A client that
    goes away (``http`` disconnects) stops the generation of its request."""
    request = await engine.submit(body)
    shaper = responses.shaper_for(body.target.model, isinstance(body, EngineChatRequest),
                                  request.rows, request.host.token_text)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = responses.stream(request, shaper, include_usage)
        return StreamingResponse(_guarded(events, lambda: engine.batcher.cancel(request)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        done = await unless_gone(responses.collect(request, shaper), http)
    except asyncio.CancelledError:
        engine.batcher.cancel(request)
        raise
    if done is None:  # the client left: nobody reads the answer
        engine.batcher.cancel(request)
        return Response(status_code=499)
    return JSONResponse(done[0])


def build_engine(settings: Settings) -> Backend:
    """The engine ``settings.engine_backend`` asks for (``auto``: vLLM if there is one). Which
    one serves, and why, is logged and shown in ``/health`` (``backend``, ``backend_reason``).

    Raises:
        RuntimeError: ``vllm`` was asked for, and there is neither a vLLM environment nor a
            configured server.
    """
    if settings.engine_nice and hasattr(os, "nice"):
        os.nice(settings.engine_nice)  # before any thread or server starts: they inherit it
    backend = settings.engine_backend
    python, why = (None, "LORAFLEET_ENGINE_BACKEND=builtin") if backend == "builtin" else (
        find_vllm_python(settings))
    if backend != "builtin" and (python is not None or settings.vllm_servers):
        if python is None:
            why = f"vLLM servers in LORAFLEET_VLLM_SERVERS only ({why})"
        log.info("lorafleet serve: generating with vLLM: %s", why)
        engine = VllmEngine(settings, python, storage.local_folder("logs", "vllm"),
                            adapters=_adapter_folders(),
                            cpu=pick_device(settings.engine_device).type == "cpu")
        engine.reason = why
        return engine
    if backend == "vllm":
        raise RuntimeError(f"LORAFLEET_ENGINE_BACKEND=vllm, but {why}: run `make venv-vllm`, "
                           "or set LORAFLEET_VLLM_PYTHON or LORAFLEET_VLLM_SERVERS")
    if backend == "auto":
        why = (f"no vLLM environment: {why}; run `make venv-vllm` in the project's folder, "
               "or set LORAFLEET_VLLM_PYTHON")
    log.warning("lorafleet serve: generating with the built-in engine: %s", why)
    if settings.engine_torch_threads:
        import torch

        torch.set_num_threads(settings.engine_torch_threads)
    builtin = Engine(settings, adapters=_adapter_folders())
    builtin.reason = why
    return builtin


def _adapter_folders() -> AdapterFolders:
    return AdapterFolders(storage.get_store(), storage.get_cache())


def _log_to_stderr() -> None:
    # uvicorn configures its own loggers only: without this, which backend serves, and the
    # vLLM servers' starts and stops, would not show in the engine's log.
    logger = logging.getLogger("engine")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def create_app(engine: Backend | None = None) -> FastAPI:
    """The engine service. Without ``engine``, one is built from the settings."""
    if engine is None:
        _log_to_stderr()
    backend = engine if engine is not None else build_engine(get_settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await backend.open()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="lorafleet engine", version="0.1.0", lifespan=lifespan,
                  description="Generation with LoRA adapters; called by the lorafleet API.")
    http_errors.install(app)
    app.state.engine = backend

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Queue and model state."""
        return {"status": "ok", **backend.stats()}

    @app.post("/v1/completions")
    async def completions(body: EngineCompletionRequest, http: HTTPRequest) -> Any:
        """A text completion for a resolved target."""
        return await backend.answer(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: EngineChatRequest, http: HTTPRequest) -> Any:
        """A chat completion for a resolved target."""
        return await backend.answer(body, http)

    return app
