"""The API while PostgreSQL or Redis is away: 503 with ``Retry-After`` in OpenAI's error shape
where a route needs the missing part, answers as usual where it does not, a job status read
before the outage served marked as stale, ``/health`` naming the part that is down, and
nothing written half. Then the servers come back and so does every route, without a restart.

The API runs in this process on a PostgreSQL server and a Redis server of this module's own
(:mod:`tests.support.servers`), which the tests stop and start.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.auth import create_key
from api.status_cache import STALE_HEADER
from shared import storage
from shared.db import session_scope
from shared.models import Job
from tests.security.expect import error_of
from tests.support.clock import install_clock
from tests.support.servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

RECORD = {"prompt": "What is two and two?", "completion": "Four."}
HUB_MODEL = "some-org/some-model"  # a valid hub id: job creation never loads it


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def servers(postgres: PrivatePostgres, redis_server: PrivateRedis
            ) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    """Both servers up at the start and at the end of each test."""
    yield postgres, redis_server
    if not postgres.running():
        postgres.start()
    if redis_server.proc is None:
        redis_server.start()


class Api:
    """The API in this process, on a fresh database of the private server, with a key and
    an uploaded file of project ``p``."""

    def __init__(self, started_app: Callable[..., TestClient], pg: PrivatePostgres,
                 redis: PrivateRedis, **settings: Any):
        self.queue = f"lorafleet.test.{secrets.token_hex(4)}"
        self.client = started_app(
            database_url=pg.database_url(f"lf_{secrets.token_hex(6)}"), broker_url=redis.url,
            queue=self.queue, **settings)
        with session_scope() as s:
            self.headers = {"Authorization": f"Bearer {create_key(s, 'p')[1]}"}
        self.file_id = self.upload().json()["id"]

    def upload(self) -> httpx.Response:
        return self.client.post(
            "/v1/files", headers=self.headers, data={"purpose": "fine-tune"},
            files={"file": ("data.jsonl", json.dumps(RECORD).encode() + b"\n")})

    def create_job(self) -> httpx.Response:
        return self.client.post("/v1/fine_tuning/jobs", headers=self.headers, json={
            "model": HUB_MODEL, "training_file": self.file_id, "max_steps": 2})

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.get(path, headers=self.headers if headers is None else headers)


@pytest.fixture
def api(started_app: Callable[..., TestClient], servers: tuple[PrivatePostgres, PrivateRedis]
        ) -> Callable[..., Api]:
    return lambda **settings: Api(started_app, *servers, **settings)


def assert_unavailable(answer: httpx.Response, code: str) -> None:
    error = error_of(answer, 503)
    assert error["type"] == "server_error"
    assert error["code"] == code
    assert answer.headers["Retry-After"].isdigit()


def test_routes_that_need_the_database_answer_503_and_recover(
        api: Callable[..., Api], servers: tuple[PrivatePostgres, PrivateRedis]) -> None:
    pg, _ = servers
    a = api()
    job_id = a.create_job().json()["id"]
    before = a.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    reads = ["/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}/events",
             f"/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/files",
             f"/v1/files/{a.file_id}", "/v1/models", "/v1/webhook_endpoints",
             "/v1/fine_tuning/jobs/ftjob-neverread"]

    pg.stop()
    answers = {path: a.get(path) for path in reads}
    writes = {"create a job": a.create_job(), "upload a file": a.upload(),
              "cancel": a.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel",
                                      headers=a.headers),
              "delete the file": a.client.delete(f"/v1/files/{a.file_id}", headers=a.headers)}
    unknown_key = a.get("/v1/files", {"Authorization": "Bearer lf-not-checked-yet"})
    independent = [a.client.get("/console"), a.client.get("/metrics")]
    health = a.client.get("/health")
    pg.start()
    after = {path: a.get(path) for path in reads}
    listed = a.get("/v1/fine_tuning/jobs").json()["data"]
    files = a.get("/v1/files").json()["data"]

    for answer in [*answers.values(), *writes.values(), unknown_key]:
        assert_unavailable(answer, "database_unavailable")
    assert [r.status_code for r in independent] == [200, 200]
    assert health.status_code == 503 and health.headers["Retry-After"].isdigit()
    assert health.json()["status"] == "degraded"
    assert health.json()["database"].startswith("error")
    assert health.json()["broker"] == health.json()["storage"] == "ok"
    assert {path: r.status_code for path, r in after.items()} == {
        **{path: 200 for path in reads}, "/v1/fine_tuning/jobs/ftjob-neverread": 404}
    assert a.client.get("/health").json()["status"] == "ok"
    # Nothing that was refused happened, not even in part.
    assert [j["id"] for j in listed] == [job_id]
    assert listed[0]["status"] == before["status"]
    assert [f["id"] for f in files] == [a.file_id]
    assert storage.get_store().list("files/") == [f"files/{a.file_id}.jsonl"]


def test_a_status_read_before_the_outage_is_served_marked_stale(
        api: Callable[..., Api], servers: tuple[PrivatePostgres, PrivateRedis],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pg, _ = servers
    a = api(status_cache_seconds=1, auth_cache_seconds=10, stale_status_seconds=300)
    clock = install_clock(monkeypatch)
    job_id = a.create_job().json()["id"]
    path = f"/v1/fine_tuning/jobs/{job_id}"
    fresh = a.get(path)
    other = {"Authorization": f"Bearer {_key('q')}"}
    a.get(path, other)  # q's key is checked (its answer is a 404)
    clock.advance(60)  # past both caches' TTLs, within stale_status_seconds

    pg.stop()
    stale = a.get(path)
    others = a.get(path, other)
    clock.advance(300)  # past stale_status_seconds
    too_old = a.get(path)
    pg.start()
    back = a.get(path)

    assert fresh.status_code == stale.status_code == 200
    assert stale.content == fresh.content
    assert STALE_HEADER not in fresh.headers and "age" not in fresh.headers
    assert stale.headers[STALE_HEADER] == "database_unavailable"
    assert stale.headers["Age"] == "60"
    assert_unavailable(others, "database_unavailable")  # another project's: never served
    assert_unavailable(too_old, "database_unavailable")
    assert back.status_code == 200 and STALE_HEADER not in back.headers


def test_no_stale_status_when_it_is_turned_off(
        api: Callable[..., Api], servers: tuple[PrivatePostgres, PrivateRedis],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pg, _ = servers
    a = api(status_cache_seconds=1, stale_status_seconds=0)
    clock = install_clock(monkeypatch)
    path = f"/v1/fine_tuning/jobs/{a.create_job().json()['id']}"
    a.get(path)
    clock.advance(2)

    pg.stop()
    answer = a.get(path)
    pg.start()

    assert_unavailable(answer, "database_unavailable")


def test_a_job_created_while_the_broker_is_away_is_stored_and_sent_later(
        api: Callable[..., Api], servers: tuple[PrivatePostgres, PrivateRedis]) -> None:
    """The job is stored whole and answered 200; its wake-up call waits in the database
    (``enqueued_at`` unset) until a sweeper finds the broker back."""
    import redis

    from worker.sweeper import sweep

    _, broker = servers
    a = api()
    broker.kill()
    created = a.create_job()
    health = a.client.get("/health")
    row = _job(created.json()["id"])
    swept_while_down = sweep()
    broker.start()
    queue_before = _queue_length(redis, broker, a.queue)
    swept = sweep()
    queue_after = _queue_length(redis, broker, a.queue)

    assert created.status_code == 200, created.text
    assert created.json()["status"] == "validating_files"
    assert health.status_code == 503 and health.json()["broker"].startswith("error")
    assert health.json()["database"] == "ok"
    assert (row.status, row.enqueued_at) == ("queued", None)
    assert swept_while_down == []  # tried, and it stays unsent: the next sweep tries again
    assert swept == [row.id]
    assert _job(row.id).enqueued_at is not None
    assert (queue_before, queue_after) == (0, 1)


def _key(project: str) -> str:
    with session_scope() as s:
        return create_key(s, project)[1]


def _job(job_id: str) -> Job:
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        s.expunge(job)
        return job


def _queue_length(redis: Any, broker: PrivateRedis, queue: str) -> int:
    client = redis.Redis.from_url(broker.url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()
