"""The FastAPI application: routers, error mapping, start-up."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.engine import EngineClient
from api.errors import ERROR_RESPONSES
from api.limits import RequestLimits
from api.routes import files, health, inference, jobs
from shared import http_errors
from shared.settings import get_settings


@asynccontextmanager
async def _lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    settings = get_settings()
    if settings.auto_migrate:
        from shared.migrate import upgrade

        upgrade()
    app.state.engine = EngineClient(settings.engine_url, settings.engine_timeout_seconds)
    try:
        yield
    finally:
        await app.state.engine.aclose()


def create_app() -> FastAPI:
    app = FastAPI(
        title="lorafleet",
        version="0.1.0",
        description="LoRA fine-tuning jobs over an OpenAI-shaped API.",
        lifespan=_lifespan,
    )
    http_errors.install(app)
    app.add_middleware(RequestLimits)

    app.include_router(health.router)
    for router in (files.router, jobs.router, inference.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    return app
