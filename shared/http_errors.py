"""The one place where exceptions become HTTP responses, in OpenAI's error shape.

Both HTTP services install these handlers: the API (``api/main.py``) and the inference engine
(``engine/app.py``), so a client sees the same error body from either; the API passes
the engine's errors through unchanged.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import LorafleetError

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


def install(app: FastAPI) -> None:
    @app.exception_handler(LorafleetError)
    async def _domain(_: Request, exc: LorafleetError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status, headers=getattr(exc, "headers", None))

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
