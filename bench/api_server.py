"""lorafleet's API app plus one bare endpoint, served the way ``lorafleet api`` serves it.

The API benchmark compares a job-status GET with ``GET /bench/bare`` (no database, no key, a
constant body; ``/bench/bare-sync`` is the same as a plain ``def`` route, run in the thread
pool as lorafleet's routes are) on this same server process, so the difference is the route's
own cost.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def create_app() -> FastAPI:
    from api.main import create_app as lorafleet_app

    app = lorafleet_app()

    @app.get("/bench/bare", include_in_schema=False)
    async def bare() -> dict[str, Any]:
        return {"status": "ok"}

    # A plain `def` route, like lorafleet's: FastAPI runs it in its thread pool.
    @app.get("/bench/bare-sync", include_in_schema=False)
    def bare_sync() -> dict[str, Any]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    from shared.settings import get_settings

    s = get_settings()
    # As cli.main's `api` command runs uvicorn, but with this app.
    uvicorn.run("bench.api_server:create_app", factory=True, host=s.host, port=s.port,
                log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
