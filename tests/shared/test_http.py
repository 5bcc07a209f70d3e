"""The pooled client between lorafleet's services drops idle connections before the servers
it calls do, so no request goes out on a connection the server is closing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from shared.http import KEEPALIVE_EXPIRY_SECONDS, SERVER_KEEP_ALIVE_SECONDS, internal_client
from shared.settings import Settings
from tests.support.processes import free_port


async def _peer_port(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers with the client's port: one port per TCP connection."""
    if scope["type"] != "http":
        return
    body = str(scope["client"][1]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server_url() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(_peer_port, host="127.0.0.1", port=port, log_level="warning",
                            timeout_keep_alive=SERVER_KEEP_ALIVE_SECONDS, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_client_expires_idle_connections_before_the_servers_do() -> None:
    assert KEEPALIVE_EXPIRY_SECONDS < SERVER_KEEP_ALIVE_SECONDS


def test_a_connection_idle_past_the_expiry_is_not_reused(server_url: str) -> None:
    """Back to back, requests share one connection; after an idle pause longer than the
    pool's expiry (and shorter than the server's keep-alive, so the server would still
    accept it), the next request opens a new one instead of racing the server's close."""

    async def ports() -> list[str]:
        async with internal_client(10, base_url=server_url) as client:
            first = (await client.get("/")).text
            again = (await client.get("/")).text
            await asyncio.sleep(KEEPALIVE_EXPIRY_SECONDS + 0.5)
            later = (await client.get("/")).text
        return [first, again, later]

    first, again, later = asyncio.run(ports())
    assert again == first  # the pool does keep connections
    assert later != first  # but not past its expiry


def test_the_engine_and_its_vllm_servers_keep_connections_longer_than_the_pool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`lorafleet serve` and the vLLM servers it starts keep idle connections for
    SERVER_KEEP_ALIVE_SECONDS, longer than the API's and the engine's pools do."""
    from cli import main as cli_main
    from engine.vllm.servers import ServerManager

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    assert cli_main.cmd_serve() == 0
    assert seen["timeout_keep_alive"] == SERVER_KEEP_ALIVE_SECONDS

    client = internal_client(10)
    env = ServerManager(Settings(), None, tmp_path, client, cpu=True).environment()
    asyncio.run(client.aclose())
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) == SERVER_KEEP_ALIVE_SECONDS
