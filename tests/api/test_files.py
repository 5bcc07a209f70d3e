"""``GET /v1/files``: pages of one purpose are cut after the purpose is filtered.

The API runs in this process. Uploads accept ``fine-tune`` only, so files of other purposes are
written straight to the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from api.auth import create_key
from shared.db import session_scope
from shared.ids import new_id, now
from shared.models import File


def add_files(project: str, purposes: str) -> list[tuple[str, str]]:
    """Record a file of each purpose in ``purposes`` (oldest first); their (id, purpose),
    newest first, as the listing orders them."""
    made = []
    for purpose in purposes.split():
        file_id = new_id("file")
        with session_scope() as s:
            s.add(File(id=file_id, project=project, filename="data.jsonl", purpose=purpose,
                       bytes=1, created_at=now(), path=f"files/{file_id}.jsonl",
                       sha256="0" * 64))
        made.append((file_id, purpose))
    return made[::-1]


def pages(api: TestClient, headers: dict[str, str], **query: Any) -> list[tuple[list[str], bool]]:
    """Every page of ``GET /v1/files``, each as (ids, has_more), following ``after``."""
    found: list[tuple[list[str], bool]] = []
    while True:
        answer = api.get("/v1/files", headers=headers, params=query)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found.append(([f["id"] for f in body["data"]], body["has_more"]))
        if not body["has_more"] or not body["data"]:
            return found
        query["after"] = body["data"][-1]["id"]


def test_pages_of_one_purpose_are_full_and_end_with_has_more_false(
    started_app: Callable[..., TestClient]
) -> None:
    api = started_app()
    with session_scope() as s:
        headers = {"Authorization": f"Bearer {create_key(s, 'p')[1]}"}
    files = add_files("p", "fine-tune batch batch fine-tune batch fine-tune fine-tune batch "
                           "batch batch fine-tune")
    tuned = [i for i, purpose in files if purpose == "fine-tune"]
    batch = [i for i, purpose in files if purpose == "batch"]

    assert pages(api, headers, purpose="fine-tune", limit=2) == [
        (tuned[0:2], True), (tuned[2:4], True), (tuned[4:5], False)]
    assert pages(api, headers, purpose="batch", limit=6) == [(batch, False)]
    assert pages(api, headers, purpose="assistants", limit=2) == [([], False)]
    assert pages(api, headers, limit=len(files)) == [([i for i, _ in files], False)]
