"""What the request-metrics middleware costs a job-status GET: ``python -m bench.metrics_overhead``.

The API app runs in this process against SQLite, without a server, so that the route's own
cost (key check and status answer, both cached as deployed) is all that is measured, not
HTTP parsing: that makes the middleware's share as large as it can be. Times are CPU times of
this process, medians over alternating rounds.

Two figures: the middleware's own cost (around an app that only answers, with and without
it), as a share of a job-status GET; and, for the record, the same GET on two apps identical
but for the middleware (their difference is within the noise of a busy machine). Exits 1 if
the middleware's share is over ``--max-overhead`` (default 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from typing import Any

RECORD = b'{"prompt": "What is two and two?", "completion": "Four."}\n'


def _apps() -> tuple[Any, Any, dict[str, str], str]:
    """Two apps (with and without the middleware), a key, and a job's status path."""
    from fastapi.testclient import TestClient

    from api.auth import create_key
    from api.main import create_app
    from api.metrics import RequestMetrics
    from api.status_cache import status_cache
    from shared.db import session_scope

    with_metrics = create_app()
    without = create_app()
    without.user_middleware = [m for m in without.user_middleware if m.cls is not RequestMetrics]
    assert len(without.user_middleware) == len(with_metrics.user_middleware) - 1
    with TestClient(create_app()) as client:  # its start-up migrates the database
        with session_scope() as s:
            headers = {"authorization": f"Bearer {create_key(s, 'bench')[1]}"}
        upload = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                             files={"file": ("data.jsonl", RECORD)})
        job = client.post("/v1/fine_tuning/jobs", headers=headers, json={
            "model": "some-org/some-model", "training_file": upload.json()["id"],
            "max_steps": 2})
        assert job.status_code == 200, job.text
    status_cache.clear()  # its entries belong to the test client's event loop
    return with_metrics, without, headers, f"/v1/fine_tuning/jobs/{job.json()['id']}"


async def _get(app: Any, path: str, headers: dict[str, str]) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _round(app: Any, path: str, headers: dict[str, str], requests: int) -> float:
    """CPU seconds of this process per request over ``requests`` sequential GETs: on a
    machine that runs anything else, wall time would measure the neighbours too."""
    t0 = time.process_time()
    for _ in range(requests):
        if await _get(app, path, headers) != 200:
            raise SystemExit("the status GET did not answer 200")
    return (time.process_time() - t0) / requests


class _Route:
    path = "/v1/fine_tuning/jobs/{job_id}"


async def _answer_only(scope: Any, receive: Any, send: Any) -> None:
    """An app that does nothing but route and answer: what the middleware wraps, timed."""
    scope["route"] = _Route
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _middleware_cost(rounds: int, requests: int) -> float:
    from api.metrics import RequestMetrics

    wrapped = RequestMetrics(_answer_only)
    differences = []
    for _ in range(rounds):
        bare = await _round(_answer_only, "/v1/fine_tuning/jobs/x", {}, requests)
        differences.append(await _round(wrapped, "/v1/fine_tuning/jobs/x", {}, requests) - bare)
    return statistics.median(differences)


async def _measure(rounds: int, requests: int) -> tuple[float, float, float, float]:
    with_metrics, without, headers, path = _apps()
    for app in (with_metrics, without):  # warm: caches filled, middleware stacks built
        await _round(app, path, headers, 200)
    timed: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(rounds):
        order = ("with", "without") if i % 2 else ("without", "with")
        for name in order:
            app = with_metrics if name == "with" else without
            timed[name].append(await _round(app, path, headers, requests))
    added = statistics.median(w - b for w, b in zip(timed["with"], timed["without"],
                                                     strict=True))
    own = await _middleware_cost(rounds, 20 * requests)
    return (statistics.median(timed["without"]), statistics.median(timed["with"]), added, own)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=1000, help="GETs per round")
    parser.add_argument("--max-overhead", type=float, default=0.05,
                        help="the most the middleware may add, as a fraction (default 0.05)")
    args = parser.parse_args(argv)

    import os

    from shared.settings import get_settings

    with tempfile.TemporaryDirectory() as work:
        os.environ["LORAFLEET_STORAGE_DIR"] = work
        get_settings.cache_clear()
        base, with_metrics, added, own = asyncio.run(_measure(args.rounds, args.requests))
    share = own / with_metrics
    print(f"job-status GET, in process (CPU): {base * 1e6:.1f} us on the app without the "
          f"metrics middleware, {with_metrics * 1e6:.1f} us with it (difference "
          f"{added * 1e6:+.1f} us: on a busy machine, mostly noise)")
    print(f"metrics middleware: {own * 1e6:.2f} us a request = {share:.1%} of a job-status GET "
          f"(goal <= {args.max_overhead:.0%})")
    return 0 if share <= args.max_overhead else 1


if __name__ == "__main__":
    sys.exit(main())
