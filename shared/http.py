"""The pooled HTTP client one lorafleet service uses to call another (API → engine → vLLM).

The servers called keep an idle connection open for 5 s (uvicorn's ``timeout_keep_alive`` and
vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), and httpx keeps an idle pooled connection for 5 s too.
With equal limits, a request can go out on a connection in the very moment the server closes it,
and fail with "Server disconnected without sending a response": under load, a 503 for a request
that no server saw. The pool here drops idle connections well before the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import httpx
from starlette.requests import Request

# Below the 5 s that uvicorn and vLLM keep an idle connection, with margin for a busy event loop.
KEEPALIVE_EXPIRY_SECONDS = 2.0
SERVER_KEEP_ALIVE_SECONDS = 5  # what the engine's uvicorn and its vLLM servers are given


def internal_client(timeout: float, base_url: str = "") -> httpx.AsyncClient:
    """A pooled client for calls between lorafleet's services and to vLLM: ``timeout`` for a
    whole answer, 5 s to connect, idle connections dropped before the server drops them."""
    return httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100,
                            keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS))


async def disconnected(http: Request) -> None:
    """Return once ``http``'s client has gone away (polled every 0.25 s)."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)


async def unless_gone(call: Awaitable[Any], http: Request | None) -> tuple[Any] | None:
    """``(result,)`` of awaiting ``call``; None, with ``call`` cancelled, if ``http``'s client
    disconnected first (``http`` None: just the result)."""
    task = asyncio.ensure_future(call)
    if http is None:
        return (await task,)
    watcher = asyncio.ensure_future(disconnected(http))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return (task.result(),)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
