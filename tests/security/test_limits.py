"""The operator's limits: each is documented, refuses one past it, and accepts the limit itself.

Validation limits run against the API in this process (fresh SQLite, filesystem broker, no
worker); the per-project running limit is checked at claim time and end to end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from tests.security.expect import error_of
from tests.support import BACKENDS, Stack, create_job, upload_dialogsum, wait_for_status
from tests.support.backends import Backend

LIMITS = ["max_upload_bytes", "max_upload_lines", "max_record_chars", "max_request_bytes",
          "max_length_limit", "max_lora_r", "max_steps_limit", "max_epochs_limit",
          "max_queued_jobs_per_project", "max_running_jobs_per_project", "max_tokens_limit",
          "models_dir"]
RECORD = {"prompt": "What is two and two?", "completion": "Four."}
HUB_MODEL = "some-org/some-model"  # a valid hub id: job creation never loads it


def line(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


@pytest.mark.parametrize("name", LIMITS)
def test_every_limit_is_a_documented_setting(name: str) -> None:
    field = Settings.model_fields[name]

    assert field.description and len(field.description) > 20


# --------------------------------------------------------------------------- in-process API
class Api:
    """The API in this process with some settings; ``key`` belongs to project ``p``."""

    def __init__(self, client: TestClient, key: str):
        self.client = client
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}

    def upload(self, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post("/v1/files", headers={**self.headers, **(headers or {})},
                                data={"purpose": "fine-tune"},
                                files={"file": ("data.jsonl", content, "application/jsonl")})

    def create(self, training_file: str, key: str | None = None, **fields: Any
               ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else self.headers
        return self.client.post("/v1/fine_tuning/jobs", headers=headers, json={
            "model": HUB_MODEL, "training_file": training_file, "max_steps": 2, **fields})

    def new_key(self, project: str) -> str:
        from api.auth import create_key
        from shared.db import session_scope

        with session_scope() as s:
            return create_key(s, project)[1]


@pytest.fixture
def api_with(started_app: Callable[..., TestClient]) -> Callable[..., Api]:
    """``api_with(**settings)``: an :class:`Api` under those settings."""

    def start(**settings: Any) -> Api:
        api = Api(started_app(**settings), "")
        api.key = api.new_key("p")
        api.headers = {"Authorization": f"Bearer {api.key}"}
        return api

    return start


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Settings of a fresh database and queue: SQLite and the filesystem broker, or
    PostgreSQL and Redis (where the per-project locks are real)."""
    provisioned = Backend.provision(request.param)
    yield {k.removeprefix("LORAFLEET_").lower(): v for k, v in provisioned.env.items()}
    provisioned.cleanup()


def test_max_upload_bytes(api_with: Callable[..., Api]) -> None:
    api = api_with(max_upload_bytes=1000)
    at_limit = line(RECORD) * (1000 // len(line(RECORD)))

    error = error_of(api.upload(at_limit + line(RECORD) * 2), 413)

    assert (error["param"], error["code"]) == ("file", "payload_too_large")
    assert "limit of 1000 bytes" in error["message"]
    assert api.upload(at_limit).status_code == 200


def test_max_upload_lines(api_with: Callable[..., Api]) -> None:
    api = api_with(max_upload_lines=3)

    error = error_of(api.upload(line(RECORD) * 4), 413)

    assert error["message"].startswith("line 4: more than 3 lines")
    assert api.upload(line(RECORD) * 3).status_code == 200


def test_max_record_chars(api_with: Callable[..., Api]) -> None:
    api = api_with(max_record_chars=200)
    long = {"prompt": "x" * 200, "completion": "y"}

    error = error_of(api.upload(line(RECORD) + line(long)), 400)

    assert error["message"].startswith("line 2: record is")
    assert "the limit is 200" in error["message"]
    assert api.upload(line({"prompt": "x" * 150, "completion": "y"})).status_code == 200


@pytest.mark.parametrize(("setting", "limit", "field", "over"), [
    ("max_length_limit", 256, {"max_length": 257}, "max_length"),
    ("max_lora_r", 8, {"lora": {"r": 9}}, "lora.r"),
    ("max_steps_limit", 100, {"max_steps": 101}, "max_steps"),
    ("max_steps_limit", 100, {"save_steps": 101}, "save_steps"),
    ("max_epochs_limit", 3, {"max_steps": None, "n_epochs": 4}, "n_epochs"),
    ("max_epochs_limit", 3, {"max_steps": None, "hyperparameters": {"n_epochs": 4}},
     "n_epochs"),
])
def test_job_field_limits(api_with: Callable[..., Api], setting: str, limit: int,
                          field: dict[str, Any], over: str) -> None:
    api = api_with(**{setting: limit})
    file_id = api.upload(line(RECORD)).json()["id"]
    at_limit = json.loads(json.dumps(field).replace(str(limit + 1), str(limit)))

    error = error_of(api.create(file_id, **field), 422)

    assert error["param"] == over
    assert f"at most {limit}" in error["message"]
    assert api.create(file_id, **at_limit).status_code == 200


def test_max_request_bytes(api_with: Callable[..., Api]) -> None:
    api = api_with(max_request_bytes=2000)
    file_id = api.upload(line(RECORD)).json()["id"]  # uploads have their own limit
    big = {"metadata": {f"k{i}": "v" * 200 for i in range(12)}}

    error = error_of(api.create(file_id, **big), 413)
    small = api.create(file_id, metadata={"k": "v" * 200})

    assert error["code"] == "payload_too_large"
    assert "limit of 2000 bytes" in error["message"]
    assert small.status_code == 200


def test_bodies_without_a_length_are_counted(api_with: Callable[..., Api]) -> None:
    api = api_with(max_request_bytes=2000, max_upload_bytes=1000)
    file_id = api.upload(line(RECORD)).json()["id"]
    body = json.dumps({"model": HUB_MODEL, "training_file": file_id,
                       "metadata": {f"k{i}": "v" * 200 for i in range(12)}}).encode()
    multipart = httpx.Request("POST", "http://x/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("a.jsonl", b"x" * (2 * 1024 * 1024))})

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: chunked encoding
        yield from (data[i:i + 512] for i in range(0, len(data), 512))

    json_error = error_of(api.client.post(
        "/v1/fine_tuning/jobs", content=chunked(body),
        headers={**api.headers, "content-type": "application/json"}), 413)
    upload_error = error_of(api.client.post(
        "/v1/files", content=chunked(multipart.read()),
        headers={**api.headers, "content-type": multipart.headers["content-type"]}), 413)

    assert json_error["code"] == upload_error["code"] == "payload_too_large"
    assert upload_error["param"] == "file"


def test_max_queued_jobs_per_project(backend: dict[str, str],
                                     api_with: Callable[..., Api]) -> None:
    api = api_with(max_queued_jobs_per_project=2, **backend)
    file_id = api.upload(line(RECORD)).json()["id"]
    first, second = api.create(file_id).json(), api.create(file_id).json()
    other_key = api.new_key("q")
    other_file = api.upload(line(RECORD), {"Authorization": f"Bearer {other_key}"}).json()["id"]

    refused = api.create(file_id)
    error = error_of(refused, 429)
    others = api.create(other_file, key=other_key)  # a per-project limit
    api.client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=api.headers)
    after_cancel = api.create(file_id)

    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "the limit is 2" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert others.status_code == 200
    assert after_cancel.status_code == 200
    listed = api.client.get("/v1/fine_tuning/jobs", headers=api.headers).json()["data"]
    assert [j["id"] for j in listed][1:] == [second["id"], first["id"]]  # nothing half-made


def test_max_running_jobs_per_project_is_enforced_at_claim(
        backend: dict[str, str], api_with: Callable[..., Api]) -> None:
    from sqlalchemy import select

    from shared import lifecycle
    from shared.db import session_scope
    from shared.models import Job
    from worker.sweeper import sweep

    api = api_with(max_running_jobs_per_project=1, requeue_after_seconds=0.001, **backend)
    file_id = api.upload(line(RECORD)).json()["id"]
    j1, j2 = api.create(file_id).json()["id"], api.create(file_id).json()["id"]
    other_key = api.new_key("q")
    other_file = api.upload(line(RECORD), {"Authorization": f"Bearer {other_key}"}).json()["id"]
    q1 = api.create(other_file, key=other_key).json()["id"]

    first = lifecycle.claim(j1, "w1")
    declined = lifecycle.claim(j2, "w2")
    other_project = lifecycle.claim(q1, "w2")
    with session_scope() as s:
        j2_status = s.scalar(select(Job.status).where(Job.id == j2))
    resent = sweep()
    assert first is not None
    lifecycle.finish(j1, first.attempt, lifecycle.JobStatus.SUCCEEDED, message="done")
    after_finish = lifecycle.claim(j2, "w2")

    assert declined is None and j2_status == "queued"
    assert other_project is not None
    assert j2 in resent  # the sweeper sends the declined job again
    assert after_finish is not None and after_finish.attempt == 1


# --------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_a_projects_jobs_run_one_at_a_time_under_a_running_limit(
        make_stack: Any, tiny_model: Path) -> None:
    stack: Stack = make_stack(workers=2, settings={"max_running_jobs_per_project": 1,
                                                   "requeue_after_seconds": 1})
    client = stack.openai()
    file_id = upload_dialogsum(client, 8).id
    jobs = [create_job(client, str(tiny_model), file_id, max_steps=2, save_steps=2).id
            for _ in range(2)]

    for job_id in jobs:
        wait_for_status(client, job_id, "succeeded", timeout=240)
    spans = sorted(stack.sql("SELECT started_at, ended_at FROM job_attempts"))

    assert len(spans) == 2
    assert spans[1][0] >= spans[0][1], f"attempts overlapped: {spans}"
