"""Property-based uploads through the real route, in this process (fresh SQLite, no worker):
whatever a JSONL file holds, ``POST /v1/files`` stores it (200) or refuses it with a 4xx that
names the line; never a 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from tests.support.hostile_jsonl import jsonl_files

LINE_LIMIT = 4
RECORD_LIMIT = 20_000


@pytest.fixture
def upload(started_app: Callable[..., TestClient]) -> Callable[[bytes], httpx.Response]:
    """Upload a file's bytes to an API with small line and record limits."""
    from api.auth import create_key
    from shared.db import session_scope

    client = started_app(max_upload_lines=LINE_LIMIT, max_record_chars=RECORD_LIMIT)
    with session_scope() as s:
        headers = {"Authorization": f"Bearer {create_key(s, 'fuzz')[1]}"}

    def send(content: bytes) -> httpx.Response:
        return client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                           files={"file": ("data.jsonl", content, "application/jsonl")})

    return send


# The app starts once per test, not per example: the function-scoped fixture is meant.
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(content=jsonl_files(max_lines=LINE_LIMIT + 1))
def test_an_upload_is_stored_or_refused_naming_the_line(
    upload: Callable[[bytes], httpx.Response], content: bytes
) -> None:
    r = upload(content)

    assert r.status_code in (200, 400, 413), r.text
    if r.status_code == 200:
        assert r.json()["line_count"] == sum(1 for line in content.split(b"\n") if line.strip())
        return
    error: dict[str, Any] = r.json()["error"]
    assert re.match(r"^line \d+: ", error["message"]), error
    assert (error["param"], error["type"]) == ("file", "invalid_request_error")
