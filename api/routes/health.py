"""Liveness and readiness: the database and the broker answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

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
def health() -> JSONResponse:
    """200 when the database and the broker are reachable, 503 otherwise."""
    db, broker = _check_db(), _check_broker()
    ok = db == "ok" and broker == "ok"
    return JSONResponse({"status": "ok" if ok else "degraded", "database": db, "broker": broker},
                        status_code=200 if ok else 503)
