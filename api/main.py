"""The FastAPI application: routers, error mapping, start-up."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import errors
from api.routes import files, health, jobs
from shared.settings import get_settings


@asynccontextmanager
async def _lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    settings = get_settings()
    if settings.auto_migrate:
        from shared.migrate import upgrade

        upgrade()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="lorafleet",
        version="0.1.0",
        description="LoRA fine-tuning jobs over an OpenAI-shaped API.",
        lifespan=_lifespan,
    )
    errors.install(app)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next):  # type: ignore[no-untyped-def]
        # Refuse an oversized upload before reading it (the multipart slack is generous).
        if request.method == "POST" and request.url.path == "/v1/files":
            length = request.headers.get("content-length")
            limit = get_settings().max_upload_bytes + 1024 * 1024
            if length and length.isdigit() and int(length) > limit:
                return JSONResponse(errors.error_body(
                    f"file is larger than the limit of {get_settings().max_upload_bytes} bytes",
                    "invalid_request_error", "file", "payload_too_large"), status_code=413)
        return await call_next(request)

    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    return app
