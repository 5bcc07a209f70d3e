"""Request bodies the routes never see: too large (413), or JSON that is not text (400).

A pure ASGI middleware, so streamed responses (server-sent events) pass through untouched.
Uploads may be as large as ``max_upload_bytes`` (plus multipart framing) and are streamed to
the route; every other body is limited to ``max_request_bytes`` and, when it is JSON,
read here first: Python's JSON parser turns a ``"\\ud800"`` escape into a lone surrogate,
which no database column, tokenizer or UTF-8 response can hold.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.http_errors import error_body
from shared.settings import get_settings

UPLOAD_ROUTES = {("POST", "/v1/files")}
# Multipart framing (boundaries, part headers, the purpose field) on top of the file itself.
MULTIPART_SLACK = 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without (or with a false) Content-Length runs over
    its limit; the route's body parsing passes HTTP exceptions on to the error handlers."""

    def __init__(self, message: str, param: str | None):
        super().__init__(413, message)
        self.param = param
        self.code = "payload_too_large"


def _limit(scope: Scope) -> tuple[int, str, str | None]:
    """The byte limit of this request, the message that names it, and the field it is on."""
    settings = get_settings()
    if (scope["method"], scope["path"].rstrip("/")) in UPLOAD_ROUTES:
        return (settings.max_upload_bytes + MULTIPART_SLACK,
                f"file is larger than the limit of {settings.max_upload_bytes} bytes", "file")
    return (settings.max_request_bytes,
            f"request body is larger than the limit of {settings.max_request_bytes} bytes",
            None)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def has_lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body decodes to a string with an unpaired UTF-16 surrogate.

    Only bodies with a ``\\u`` escape can; a body that is not JSON is left to the route,
    which reports the syntax error.
    """
    if b"\\u" not in body:
        return False
    try:
        data: Any = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


class RequestLimits:
    """ASGI middleware: body size limits for every route, lone-surrogate check for JSON."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message, param = _limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, 413, message, param, "payload_too_large")
            return
        if not _is_json(scope):
            await self.app(scope, _counting(receive, limit, message, param), send)
            return
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away: nobody to answer
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                await self._refuse(scope, receive, send, 413, message, param,
                                   "payload_too_large")
                return
        if has_lone_surrogate(body):
            await self._refuse(
                scope, receive, send, 400,
                "request body: a \\u escape makes a lone UTF-16 surrogate, which is not text "
                "(escape characters outside the BMP as a surrogate pair)", None, "invalid_value")
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      param: str | None, code: str) -> None:
        response = JSONResponse(error_body(message, "invalid_request_error", param, code),
                                status_code=status)
        await response(scope, receive, send)


def _counting(receive: Receive, limit: int, message: str, param: str | None) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(message, param)
        return msg

    return wrapped


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the body read already, then the client's next messages
    (a streamed response listens there for a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
