"""The pooled HTTP client one lorafleet service uses to call another (API → engine → vLLM).

The servers called keep an idle connection open for 5 s (uvicorn's ``timeout_keep_alive`` and
vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), and httpx keeps an idle pooled connection for 5 s too.
With equal limits, a request can go out on a connection in the very moment the server closes it,
and fail with "Server disconnected without sending a response": under load, a 503 for a request
that no server saw. The pool here drops idle connections well before the server does.
"""

from __future__ import annotations

import httpx

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
