"""Liveness and readiness: the database and the broker answer; which inference engine serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.engine import engine_client
from shared.db import get_engine
from shared.queue import get_celery

router = APIRouter(tags=["health"])


def _check_db() -> str:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


def _check_broker() -> str:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the database and the broker are reachable, 503 otherwise; ``engine`` says
    whether the inference engine answers, which backend generates (vLLM or the built-in
    engine) and why (informative: the API runs without an engine too)."""
    db, broker = await run_in_threadpool(_check_db), await run_in_threadpool(_check_broker)
    engine = await engine_client(request).health()
    ok = db == "ok" and broker == "ok"
    return JSONResponse({"status": "ok" if ok else "degraded", "database": db, "broker": broker,
                         "engine": engine}, status_code=200 if ok else 503)
