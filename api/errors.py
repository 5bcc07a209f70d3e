"""The one place where exceptions become HTTP responses, in OpenAI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import LorafleetError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    # pydantic adds the union branch name (e.g. "PromptFormat") to the location; drop it.
    return ".".join(p for p in parts if not p[:1].isupper() and not p.startswith("function-"))


def install(app: FastAPI) -> None:
    @app.exception_handler(LorafleetError)
    async def _domain(_: Request, exc: LorafleetError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
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
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"),
                            status_code=500)
