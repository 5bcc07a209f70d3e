"""Every route but the health check and the docs needs a valid API key.

The routes are enumerated from the application itself, so a route added later is covered
without touching this test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import fastapi.routing
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.security.expect import error_of

PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
          # Prometheus scrapes without an API key (LORAFLEET_METRICS_TOKEN can require one);
          # the console's page and assets are static: signing in happens in the browser.
          "/metrics", "/", "/console", "/console/assets/{version}/{name:path}"}


def app_routes(app: fastapi.FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route of ``app``, included routers flattened."""
    # FastAPI keeps included routers as nodes of app.routes; iter_route_contexts flattens them
    # (older versions flatten on include and have no such function).
    contexts = getattr(fastapi.routing, "iter_route_contexts", iter)(app.routes)
    found = set()
    for route in contexts:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is None or methods is None:
            continue
        found.update((m, path) for m in methods if m != "HEAD")
    return sorted(found)


def concrete(path: str) -> str:
    """A path with every parameter filled in, e.g. ``/v1/files/file-abc123``."""
    return re.sub(r"\{[^}]+\}", "file-abc123", path)


GUARDED = [(m, p) for m, p in app_routes(create_app()) if p not in PUBLIC]


@pytest.fixture
def api(settings_env: Callable[..., Any]) -> Iterator[TestClient]:
    """The API in this process, on a fresh SQLite database (migrated at start-up)."""
    settings_env()
    with TestClient(create_app()) as client:
        yield client


@pytest.fixture
def keys(api: TestClient) -> dict[str, str]:
    """A live key and a revoked key of project ``p``."""
    from api.auth import create_key, revoke_key
    from shared.db import session_scope

    with session_scope() as s:
        _, live = create_key(s, "p")
        row, revoked = create_key(s, "p")
        revoke_key(s, row.id)
    return {"live": live, "revoked": revoked}


def test_the_route_list_is_complete() -> None:
    # The enumeration itself must work, or the tests below would pass on nothing.
    assert {("POST", "/v1/files"), ("GET", "/v1/files/{file_id}/content"),
            ("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
            ("GET", "/v1/models"), ("POST", "/v1/chat/completions")} <= set(GUARDED)
    assert all(p.startswith("/v1/") for _, p in GUARDED)


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_route_refuses_requests_without_a_valid_key(
    api: TestClient, keys: dict[str, str], method: str, path: str
) -> None:
    url = concrete(path)
    headers_by_case = {
        "missing_api_key": {},
        "invalid_api_key": {"Authorization": f"Bearer {keys['live']}x"},
        "revoked": {"Authorization": f"Bearer {keys['revoked']}"},
        "malformed": {"Authorization": keys["live"]},  # no "Bearer" scheme
    }

    for case, headers in headers_by_case.items():
        error = error_of(api.request(method, url, headers=headers), 401)
        assert error["type"] == "authentication_error", case
        assert error["code"] in ("missing_api_key", "invalid_api_key"), case
        assert keys["live"] not in error["message"] and keys["revoked"] not in error["message"]
    # With the key, the same request gets past authentication.
    authorized = api.request(method, url, headers={"Authorization": f"Bearer {keys['live']}"})
    assert authorized.status_code != 401, authorized.text


@pytest.mark.parametrize("path", sorted(PUBLIC - {"/docs/oauth2-redirect",
                                                   "/console/assets/{version}/{name:path}"}))
def test_health_and_docs_need_no_key(api: TestClient, path: str) -> None:
    assert api.get(path).status_code == 200
