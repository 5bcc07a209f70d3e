"""The one place where exceptions become HTTP responses, in OpenAI's error shape.

Both HTTP services install these handlers: the API (``api/main.py``) and the inference engine
(``engine/app.py``), so a client sees the same error body from either; the API passes
the engine's errors through unchanged.

A dependency that does not answer (the database, the broker, the storage; told apart from
other errors by :mod:`shared.dependencies`) is a 503 with ``Retry-After``, never a 500. Those
errors are answered here, inside the application, rather than by Starlette's last-resort
handler: that one re-raises after its 500, and uvicorn then closes the connection, so the
client's next request on it would find no one to answer.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import dependencies
from shared.errors import DependencyUnavailable, LorafleetError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer, as OpenAI shapes it."""

    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Union branch names pydantic adds to a location ("PromptFormat", "constrained-int",
# "literal['auto']"): not fields.
_BRANCH = re.compile(r"[A-Z].*|function-.*|constrained-.*|literal\[.*\]|int|float|str|bool")


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(p for p in parts if not _BRANCH.fullmatch(p))


def error_response(exc: LorafleetError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                        status_code=exc.status, headers=getattr(exc, "headers", None))


class OutageLog:
    """Logs the 503s of an outage: the first of each dependency at once, then one line per
    ``every`` seconds with how many more there were, so that polling clients do not fill
    the log while a server restarts."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # dependency -> (logged at, since)

    def __call__(self, exc: BaseException, outage: DependencyUnavailable) -> None:
        now = time.monotonic()
        with self._lock:
            logged, more = self._last.get(outage.dependency, (-self.every, 0))
            if now - logged < self.every:
                self._last[outage.dependency] = (logged, more + 1)
                return
            self._last[outage.dependency] = (now, 0)
        log.warning("answering 503, %s%s", dependencies.describe(exc),
                    f" ({more} more 503s since the last line)" if more else "")


outage_log = OutageLog()


def install(app: FastAPI) -> None:
    @app.exception_handler(LorafleetError)
    async def _domain(_: Request, exc: LorafleetError) -> JSONResponse:
        if isinstance(exc, DependencyUnavailable):
            outage_log(exc, exc)
        return error_response(exc)

    async def _library(_: Request, exc: Exception) -> JSONResponse:
        outage = dependencies.unavailable(exc)
        if outage is None:
            log.error("unhandled error", exc_info=exc)
            return JSONResponse(error_body("internal server error", "server_error"),
                                status_code=500)
        outage_log(exc, outage)
        return error_response(outage)

    for error_type in dependencies.library_error_types():
        app.add_exception_handler(error_type, _library)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            # Not a field problem: the body is not JSON at all (as OpenAI, a 400).
            detail = (errors[0].get("ctx") or {}).get("error", "syntax error")
            where = errors[0].get("loc", ("body", "?"))[-1]
            return JSONResponse(error_body(
                f"the request body is not valid JSON: {detail} (at character {where})",
                "invalid_request_error", None, "invalid_json"), status_code=400)
        msgs = []
        for err in errors[:10]:
            where = _loc(tuple(err.get("loc", ())))
            msg = str(err.get("msg", "invalid"))
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            msgs.append(f"{where}: {msg}" if where else msg)
        first = _loc(tuple(errors[0].get("loc", ()))) if errors else None
        return JSONResponse(
            error_body("; ".join(msgs), "invalid_request_error", first or None, "invalid_value"),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = error_body(str(exc.detail), type_, getattr(exc, "param", None),
                          getattr(exc, "code", None))
        return JSONResponse(body, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"),
                            status_code=500)
