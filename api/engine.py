"""The API's client of the inference engine: forwards requests, passes answers through.

The engine answers in OpenAI's shapes already (responses, stream chunks and errors), so its
status, body and ``Retry-After`` go back to the caller unchanged; streams are relayed chunk
by chunk as they arrive.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from shared.errors import ServiceUnavailable
from shared.http import internal_client, unless_gone

PASSED_HEADERS = ("retry-after",)
HEALTH_TIMEOUT_S = 3.0


class EngineClient:
    """One pooled HTTP client for the engine, shared by all requests of the API process."""

    def __init__(self, base_url: str, timeout: float):
        self.base_url = base_url.rstrip("/")
        self._client = internal_client(timeout, base_url=self.base_url)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self) -> dict[str, Any]:
        """Whether the engine answers, which backend serves and why (its ``/health``)."""
        try:
            answer = await self._client.get("/health", timeout=HEALTH_TIMEOUT_S)
            stats = answer.json()
        except (httpx.HTTPError, ValueError) as e:
            return {"status": "unavailable", "url": self.base_url,
                    "reason": f"{type(e).__name__}: {e}"}
        if answer.status_code != 200 or not isinstance(stats, dict):
            return {"status": "unavailable", "url": self.base_url,
                    "reason": f"/health answered {answer.status_code}"}
        return {"status": "ok", "url": self.base_url, "backend": stats.get("backend"),
                "reason": stats.get("backend_reason")}

    async def forward(self, path: str, payload: dict[str, Any],
                      caller: Request | None = None) -> Response:
        """POST ``payload`` to the engine; its answer as a response (streamed if it streams).
        If ``caller`` disconnects before the answer is ready (a stream: before the engine
        starts it), the engine request is dropped, which stops its generation; a stream that
        has started does the same by itself.

        Raises:
            ServiceUnavailable: the engine does not answer.
        """
        answer = await unless_gone(self._forward(path, payload), caller)
        if answer is None:
            return Response(status_code=499)  # nobody is listening any more
        return answer[0]

    async def _forward(self, path: str, payload: dict[str, Any]) -> Response:
        try:
            upstream = await self._client.send(
                self._client.build_request("POST", path, json=payload), stream=True)
        except httpx.TransportError as e:
            raise ServiceUnavailable(
                f"The inference engine at {self.base_url} is unavailable; retry later.") from e
        headers = {k: upstream.headers[k] for k in PASSED_HEADERS if k in upstream.headers}
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
            return StreamingResponse(_relay(upstream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        try:
            body = await upstream.aread()
        except httpx.TransportError as e:
            raise ServiceUnavailable("The inference engine closed the connection.") from e
        finally:
            with anyio.CancelScope(shield=True):  # also when the client went away
                await upstream.aclose()
        return Response(body, status_code=upstream.status_code, media_type=content_type,
                        headers=headers)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.TransportError:
        # Mid-stream the status is sent already: end with an error event, as the engine would.
        error = {"error": {"message": "The inference engine closed the stream.",
                           "type": "server_error", "param": None, "code": "engine_unavailable"}}
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        # Also on a client that went away (this task is being cancelled, hence the shield):
        # closing the upstream stream tells the engine to stop generating for it.
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


def engine_error(answer: Response) -> dict[str, Any] | None:
    """The error object (``{"message", "type", "param", "code"}``) of an engine answer that is
    an error in OpenAI's shape; None for any other answer (streams included)."""
    if answer.status_code < 400 or isinstance(answer, StreamingResponse):
        return None
    try:
        error = json.loads(bytes(answer.body)).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, dict) else None


def engine_client(request: Request) -> EngineClient:
    return request.app.state.engine
