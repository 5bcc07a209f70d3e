"""Assertions shared by the security tests: OpenAI-shaped errors, and nothing half-stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tests.support import Stack


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of a response, after checking the status and OpenAI's shape (and
    that no traceback leaked into the message)."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]
    return error


@dataclass(frozen=True)
class Snapshot:
    """What a rejected request must not change: file and job rows, stored files."""

    file_rows: int
    job_rows: int
    stored: tuple[str, ...]


def snapshot(stack: Stack) -> Snapshot:
    folder = stack.storage_dir / "files"
    stored = tuple(sorted(p.name for p in folder.iterdir())) if folder.exists() else ()
    return Snapshot(
        file_rows=stack.sql("SELECT count(*) FROM files")[0][0],
        job_rows=stack.sql("SELECT count(*) FROM jobs")[0][0],
        stored=stored,
    )
