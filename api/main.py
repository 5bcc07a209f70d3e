"""The FastAPI application: routers, error mapping, start-up."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.engine import EngineClient
from api.errors import ERROR_RESPONSES
from api.limits import RequestLimits
from api.metrics import RequestMetrics
from api.routes import console, files, health, inference, jobs, metrics, models, webhooks
from shared import http_errors, outbox
from shared.settings import get_settings


@asynccontextmanager
async def _lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    settings = get_settings()
    if settings.auto_migrate:
        from shared.migrate import upgrade

        upgrade()
    app.state.engine = EngineClient(settings.engine_url, settings.engine_timeout_seconds)
    # Webhooks recorded by any process (this one, a worker, one that stopped) are sent from
    # here too; the outbox rows make that safe from any number of processes.
    dispatcher = outbox.Dispatcher(settings.webhook_poll_seconds)
    dispatcher.start()
    try:
        yield
    finally:
        await asyncio.to_thread(dispatcher.stop)
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
    app.add_middleware(RequestMetrics)  # added last: outermost, it sees the 413s too

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    for router in (files.router, jobs.router, models.router, inference.router,
                   webhooks.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    return app
