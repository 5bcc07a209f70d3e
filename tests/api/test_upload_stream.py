"""``POST /v1/files`` streams the file to storage while it checks it, on a folder and on S3:
the form's fields in any order, files of several parts, and nothing kept (no object, no
unfinished upload) when the file or the form is refused.

The API runs in this process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.auth import create_key
from shared import storage
from shared.db import session_scope
from shared.storage import folders
from shared.storage.s3 import PART_BYTES
from tests.support.seaweedfs import SeaweedFS
from tests.support.stored import commit_files

BOUNDARY = "lorafleet-test-boundary"
LINE = json.dumps({"prompt": "Summarize: " + "the cat sat on the mat " * 20,
                   "completion": "a cat sat"}) + "\n"


@pytest.fixture(params=["file", "s3"])
def api(request: pytest.FixtureRequest,
        started_app: Callable[..., TestClient]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings: dict[str, Any] = {"max_upload_bytes": 3 * PART_BYTES}
    bucket = None
    if request.param == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket = server.new_bucket()
        env = server.env(bucket, "lf")
        settings.update(storage_url=env["LORAFLEET_STORAGE_URL"], s3_path_style="true",
                        s3_endpoint_url=env["LORAFLEET_S3_ENDPOINT_URL"])
    client = started_app(**settings)
    with session_scope() as s:
        headers = {"Authorization": f"Bearer {create_key(s, 'p')[1]}"}
    yield client, headers
    if bucket is not None:
        server.drop_bucket(bucket)


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (name, filename, content) parts, in this order."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        out += (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                + content + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


def post(api: tuple[TestClient, dict[str, str]], body: bytes) -> Any:
    client, headers = api
    return client.post("/v1/files", content=body, headers={
        **headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def nothing_kept() -> bool:
    store = storage.get_store()
    return store.list("files/") == [] and store.abort_uploads("files/") == 0


def test_a_file_of_several_parts_is_stored_whole_and_hashed(
        api: tuple[TestClient, dict[str, str]]) -> None:
    content = (LINE * (2 * PART_BYTES // len(LINE) + 100)).encode()  # three parts on S3
    answer = post(api, form(("file", "big.jsonl", content), ("purpose", None, b"fine-tune")))

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["bytes"], body["filename"], body["purpose"]) == (
        len(content), "big.jsonl", "fine-tune")
    row_sha = hashlib.sha256(content).hexdigest()
    stored = b"".join(storage.get_store().read_chunks(storage.file_key(body["id"])))
    assert hashlib.sha256(stored).hexdigest() == row_sha
    client, headers = api
    download = client.get(f"/v1/files/{body['id']}/content", headers=headers)
    assert download.content == content
    assert download.headers["content-disposition"] == 'attachment; filename="big.jsonl"'


def test_the_purpose_may_come_before_or_after_the_file(
        api: tuple[TestClient, dict[str, str]]) -> None:
    before = post(api, form(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE.encode())))
    after = post(api, form(("file", "b.jsonl", LINE.encode()), ("purpose", None, b"fine-tune")))
    unknown = post(api, form(("file", "c.jsonl", LINE.encode()), ("purpose", None, b"batch")))

    assert before.status_code == after.status_code == 200
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "purpose"
    assert sorted(storage.get_store().list("files/")) == sorted(
        storage.file_key(r.json()["id"]) for r in (before, after))


@pytest.mark.parametrize(("body", "says"), [
    (form(("purpose", None, b"fine-tune")), "no complete 'file' part"),
    (form(("file", "x.jsonl", LINE.encode()))[:-30], "no complete 'file' part"),
    (b"--nonsense\r\n\r\n", "not a well-formed multipart form"),
])
def test_a_form_without_a_whole_file_part_is_refused(
        api: tuple[TestClient, dict[str, str]], body: bytes, says: str) -> None:
    answer = post(api, body)

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "file" and says in answer.json()["error"]["message"]
    assert nothing_kept()


def test_a_body_that_is_no_form_is_refused(api: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = api
    answer = client.post("/v1/files", json={"file": LINE}, headers=headers)

    assert answer.status_code == 400 and answer.json()["error"]["param"] == "file"
    assert "multipart/form-data" in answer.json()["error"]["message"]


def test_a_bad_line_past_the_first_part_keeps_nothing(
        api: tuple[TestClient, dict[str, str]]) -> None:
    good = (LINE * (PART_BYTES // len(LINE) + 10)).encode()  # one part sent already on S3
    lines = good.count(b"\n")
    answer = post(api, form(("file", "x.jsonl", good + b"not json\n" + good),
                            ("purpose", None, b"fine-tune")))

    assert answer.status_code == 400
    assert f"line {lines + 1}: invalid JSON" in answer.json()["error"]["message"]
    assert nothing_kept()


def test_a_file_over_the_limit_keeps_nothing(api: tuple[TestClient, dict[str, str]]) -> None:
    content = (LINE * (3 * PART_BYTES // len(LINE) + 10)).encode()
    answer = post(api, form(("file", "x.jsonl", content), ("purpose", None, b"fine-tune")))

    assert answer.status_code == 413 and answer.json()["error"]["param"] == "file"
    assert nothing_kept()


def test_data_sets_tokenized_from_a_file_go_with_its_last_copy(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = api
    first, second = (post(api, form(("file", n, LINE.encode()))).json() for n in "ab")
    assert first["id"] != second["id"]  # the same content, twice
    cache = storage.dataset_cache_key(hashlib.sha256(LINE.encode()).hexdigest(), "fp")
    commit_files(cache, {"meta.json": "{}"})

    client.delete(f"/v1/files/{first['id']}", headers=headers)
    kept = folders.exists(storage.get_store(), cache)
    client.delete(f"/v1/files/{second['id']}", headers=headers)

    assert kept  # the other copy may still train
    assert storage.get_store().list("files/") == storage.get_store().list("cache/") == []
