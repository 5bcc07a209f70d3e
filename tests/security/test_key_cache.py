"""API keys checked recently are trusted for ``auth_cache_seconds`` (``api.auth.key_cache``):
a key revoked in this process stops at once, one revoked elsewhere within the TTL.

The API runs in this process; "elsewhere" (the operator's ``lorafleet keys revoke``, another
API process) is an update of the key's row behind this process's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.auth import KeyCache, create_key, key_cache, key_checks, revoke_key
from api.main import create_app
from shared.db import session_scope
from shared.ids import now
from shared.models import ApiKey
from tests.security.expect import error_of
from tests.support.clock import FakeClock, install_clock

# The async job status route (its own key check) and a `def` route (the shared dependency).
PATHS = ["/v1/fine_tuning/jobs/ftjob-doesnotexist", "/v1/files"]


@pytest.fixture
def api_with(settings_env: Callable[..., Any]) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def start(**settings: Any) -> TestClient:
        settings_env(**settings)
        client = TestClient(create_app())
        client.__enter__()  # runs the start-up: migrations
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def new_key(project: str = "p") -> tuple[str, dict[str, str]]:
    """A key's id and the headers that send it."""
    with session_scope() as s:
        row, secret = create_key(s, project)
        return row.id, {"Authorization": f"Bearer {secret}"}


def revoke_elsewhere(key_id: str) -> None:
    with session_scope() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=now()))


def accepted(api: TestClient, path: str, headers: dict[str, str]) -> bool:
    status = api.get(path, headers=headers).status_code
    assert status in (200, 401, 404), status
    return status != 401


@pytest.mark.parametrize("path", PATHS)
def test_a_key_revoked_in_this_process_stops_at_once(
    api_with: Callable[..., TestClient], path: str
) -> None:
    api = api_with(auth_cache_seconds=60)
    key_id, headers = new_key()
    assert accepted(api, path, headers)

    with session_scope() as s:
        revoke_key(s, key_id)

    error = error_of(api.get(path, headers=headers), 401)
    assert (error["code"], error["message"]) == ("invalid_api_key", "Incorrect API key provided")


@pytest.mark.parametrize("path", PATHS)
def test_a_key_revoked_elsewhere_stops_after_the_ttl_and_not_before(
    api_with: Callable[..., TestClient], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 60.0
    api = api_with(auth_cache_seconds=ttl)
    clock = install_clock(monkeypatch)
    key_id, headers = new_key()
    assert accepted(api, path, headers)

    revoke_elsewhere(key_id)
    clock.advance(0.99 * ttl)
    still = accepted(api, path, headers)
    clock.advance(0.01 * ttl)

    assert still
    error_of(api.get(path, headers=headers), 401)


def test_a_key_past_half_its_ttl_is_checked_again_in_the_background(
    api_with: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 60.0
    api = api_with(auth_cache_seconds=ttl)
    clock = install_clock(monkeypatch)
    key_id, headers = new_key()
    assert accepted(api, PATHS[0], headers)  # the async route: checks keys in the background
    clock.advance(0.6 * ttl)

    revoke_elsewhere(key_id)
    still = accepted(api, PATHS[0], headers)  # served from the cache, and checked again
    deadline = time.monotonic() + 30
    while len(key_checks):
        assert time.monotonic() < deadline, "the background check did not end"
        time.sleep(0.01)
    refused = api.get(PATHS[0], headers=headers)

    assert still
    # The clock is still before the TTL, so the background check did it.
    error_of(refused, 401)


def test_with_a_ttl_of_zero_every_request_checks_the_key(
    api_with: Callable[..., TestClient]
) -> None:
    api = api_with(auth_cache_seconds=0)
    key_id, headers = new_key()
    assert accepted(api, PATHS[1], headers)

    revoke_elsewhere(key_id)

    error_of(api.get(PATHS[1], headers=headers), 401)
    assert len(key_cache) == 0


def test_unknown_keys_are_not_kept(api_with: Callable[..., TestClient]) -> None:
    api = api_with(auth_cache_seconds=60)

    for i in range(5):
        error_of(api.get(PATHS[1], headers={"Authorization": f"Bearer lf-guess-{i}"}), 401)

    assert len(key_cache) == 0


def test_the_key_cache_is_bounded(settings_env: Callable[..., Any]) -> None:
    settings_env(auth_cache_seconds=60)
    clock = FakeClock()
    cache = KeyCache(max_entries=2, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(name, f"project-{name}", clock())

    assert cache.get("a") is None
    assert (cache.get("b"), cache.get("c")) == ("project-b", "project-c")
