"""Readiness: whether the parts the API depends on answer (the database, the broker, the
storage), and which inference engine serves.

``GET /health`` answers 200 when all three parts do, and 503 with ``Retry-After`` when one
does not, naming each part's state: ``{"status": "degraded", "database": "ok", "broker":
"error: …", "storage": "ok", "engine": {…}}``. The API itself answers either way, and so do
its routes that need no missing part; a load balancer should read the 503 as "not ready", not
"restart me". ``engine`` is informative: the API runs without an engine too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.engine import engine_client
from shared import storage
from shared.db import get_engine
from shared.dependencies import describe
from shared.errors import DependencyUnavailable
from shared.queue import get_celery

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

# What a client waits before it asks again, while a part is down (as on the routes' 503s).
RETRY_AFTER_S = DependencyUnavailable("").headers["Retry-After"]


def _check_db() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker() -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    storage.get_store().check()


CHECKS: dict[str, Callable[[], None]] = {
    "database": _check_db, "broker": _check_broker, "storage": _check_storage}


async def _state(part: str, check: Callable[[], None]) -> str:
    try:
        await run_in_threadpool(check)
    except Exception as e:  # noqa: BLE001 - any failure means that part is not usable
        log.warning("health: the %s is not usable (%s)", part, describe(e))
        # The type only: /health answers without a key, and messages name hosts and users.
        return f"error: {type(e).__name__}"
    return "ok"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the database, the broker and the storage answer; 503 naming the part that
    does not. ``engine`` says whether the inference engine answers, which backend generates
    (vLLM or the built-in engine) and why."""
    *states, engine = await asyncio.gather(
        *(_state(part, check) for part, check in CHECKS.items()),
        engine_client(request).health())
    parts = dict(zip(CHECKS, states, strict=True))
    ok = all(state == "ok" for state in states)
    return JSONResponse({"status": "ok" if ok else "degraded", **parts, "engine": engine},
                        status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": RETRY_AFTER_S})
