"""The job status route's micro-cache (``api.status_cache``): fast, and still correct.

The API runs in this process (fresh SQLite, filesystem broker, no worker); a worker's write is
an update of the job's row.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from sqlalchemy import update

from api import jobs, presenters
from api import status_cache as status_module
from api.auth import create_key, key_cache
from api.status_cache import StatusCache, status_cache
from shared.db import session_scope
from shared.models import Job
from shared.schemas import JobPublic
from tests.security.expect import error_of
from tests.support.clock import FakeClock, install_clock

RECORD = {"prompt": "What is two and two?", "completion": "Four."}
HUB_MODEL = "some-org/some-model"  # a valid hub id: job creation never loads it


class Api:
    """The API in this process and a key of project ``p`` (more with :meth:`key`)."""

    def __init__(self, client: TestClient):
        self.client = client
        self.headers = self.auth(self.key("p"))

    @staticmethod
    def key(project: str) -> str:
        with session_scope() as s:
            return create_key(s, project)[1]

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def create_job(self) -> str:
        upload = self.client.post(
            "/v1/files", headers=self.headers, data={"purpose": "fine-tune"},
            files={"file": ("data.jsonl", json.dumps(RECORD).encode() + b"\n")})
        job = self.client.post("/v1/fine_tuning/jobs", headers=self.headers, json={
            "model": HUB_MODEL, "training_file": upload.json()["id"], "max_steps": 2})
        assert job.status_code == 200, job.text
        return str(job.json()["id"])

    def get(self, job_id: str, headers: dict[str, str] | None = None) -> Any:
        return self.client.get(f"/v1/fine_tuning/jobs/{job_id}",
                               headers=self.headers if headers is None else headers)


def set_status(job_id: str, status: str) -> None:
    """What a worker does: write the job's row, behind the API's back."""
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status))


@pytest.fixture
def api_with(started_app: Callable[..., TestClient]) -> Callable[..., Api]:
    """``api_with(**settings)``: an :class:`Api` under those settings."""
    return lambda **settings: Api(started_app(**settings))


# --------------------------------------------------------------------------- through the API
def test_a_cached_answer_is_the_database_answer(api_with: Callable[..., Api]) -> None:
    api = api_with(status_cache_seconds=60)
    job_id = api.create_job()

    miss, hit = api.get(job_id), api.get(job_id)
    with session_scope() as s:
        public = presenters.job_public(jobs.get_job(s, job_id, "p"))

    assert miss.status_code == hit.status_code == 200
    assert status_cache.get(job_id, "p") == miss.content  # so the second was a hit
    assert hit.content == miss.content
    assert hit.headers["content-type"] == miss.headers["content-type"] == "application/json"
    # The bytes a `def` route with response_model=JobPublic sends (FastAPI's own serializer).
    assert miss.content == TypeAdapter(JobPublic).dump_json(public, by_alias=True)
    assert JobPublic.model_validate_json(hit.content) == public


def test_a_cancel_through_the_api_shows_at_once(api_with: Callable[..., Api]) -> None:
    api = api_with(status_cache_seconds=60)
    job_id = api.create_job()
    assert api.get(job_id).json()["status"] == "queued"

    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers)
    after = api.get(job_id).json()

    assert cancelled.json()["status"] == after["status"] == "cancelled"
    assert after["finished_at"] is not None


def test_a_workers_write_shows_after_the_ttl_and_not_before(
    api_with: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 60.0
    api = api_with(status_cache_seconds=ttl)
    clock = install_clock(monkeypatch)
    job_id = api.create_job()
    assert api.get(job_id).json()["status"] == "queued"

    set_status(job_id, "running")
    clock.advance(0.99 * ttl)
    stale = api.get(job_id).json()["status"]
    clock.advance(0.01 * ttl)
    fresh = api.get(job_id).json()["status"]

    assert stale == "queued"
    assert fresh == "running"


def test_with_ttls_of_zero_nothing_is_cached(api_with: Callable[..., Api]) -> None:
    api = api_with(status_cache_seconds=0, auth_cache_seconds=0)
    job_id = api.create_job()
    assert api.get(job_id).json()["status"] == "queued"

    set_status(job_id, "running")
    answer = api.get(job_id)

    assert answer.json()["status"] == "running"
    assert len(status_cache) == len(key_cache) == 0


def test_another_projects_key_gets_404_from_a_warm_cache(api_with: Callable[..., Api]) -> None:
    api = api_with(status_cache_seconds=60)
    job_id = api.create_job()
    mine = api.get(job_id).content
    other = api.auth(api.key("q"))

    first, second = api.get(job_id, other), api.get(job_id, other)  # q's key cached by now

    for answer in (first, second):
        error = error_of(answer, 404)
        assert error == {"message": f"No such fine-tuning job: {job_id}",
                         "type": "invalid_request_error", "param": "fine_tuning_job_id",
                         "code": "not_found"}
    assert api.get(job_id).content == mine
    assert status_cache.get(job_id, "q") is None


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "lf-not-a-bearer-header"},
    {"Authorization": "Bearer lf-unknown-key"},
], ids=["missing", "empty", "basic", "no-scheme", "unknown"])
def test_bad_keys_get_the_same_401_as_every_other_route(
    api_with: Callable[..., Api], headers: dict[str, str]
) -> None:
    api = api_with(status_cache_seconds=60)
    job_id = api.create_job()
    api.get(job_id)  # the cache is warm

    answer = api.get(job_id, headers)
    # GET /v1/files is a plain `def` route with the shared key dependency.
    reference = api.client.get("/v1/files", headers=headers)

    assert error_of(answer, 401)["type"] == "authentication_error"
    assert answer.json() == reference.json()
    assert answer.headers.get("www-authenticate") == reference.headers.get("www-authenticate")


def test_an_unknown_job_is_404(api_with: Callable[..., Api]) -> None:
    api = api_with(status_cache_seconds=60)
    api.create_job()

    error = error_of(api.get("ftjob-doesnotexist"), 404)

    assert error["param"] == "fine_tuning_job_id"


# --------------------------------------------------------------------------- the cache itself
async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
def ttl(settings_env: Callable[..., Any]) -> float:
    return float(settings_env(status_cache_seconds=60).status_cache_seconds)


def test_a_read_that_began_before_a_write_is_not_kept(ttl: float) -> None:
    clock = FakeClock()
    cache = StatusCache(clock=clock)
    began = clock()
    clock.advance(0.001)
    cache.forget("ftjob-a")  # a cancel committed while the read was under way

    cache.put("ftjob-a", "p", b"{}", began)
    assert cache.get("ftjob-a", "p") is None
    cache.put("ftjob-a", "p", b"{}", clock())
    assert cache.get("ftjob-a", "p") == b"{}"


def test_an_older_read_never_replaces_a_newer_one(ttl: float) -> None:
    clock = FakeClock()
    cache = StatusCache(clock=clock)
    older = clock()
    clock.advance(0.001)
    cache.put("ftjob-a", "p", b"new", clock())

    cache.put("ftjob-a", "p", b"old", older)

    assert cache.get("ftjob-a", "p") == b"new"


def test_the_cache_is_bounded(ttl: float) -> None:
    cache = StatusCache(max_entries=2)
    for name in ("ftjob-a", "ftjob-b", "ftjob-c"):
        cache.put(name, "p", name.encode(), time.monotonic())

    assert cache.get("ftjob-a", "p") is None
    assert cache.get("ftjob-c", "p") == b"ftjob-c"


def test_misses_at_the_same_time_share_one_read(
    ttl: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = StatusCache()
    calls: list[str] = []
    release = threading.Event()

    def slow_read(job_id: str, authorization: str | None, project: str | None
                  ) -> tuple[str, bytes]:
        calls.append(job_id)
        release.wait(5)
        return "p", b"{}"

    monkeypatch.setattr(status_module, "_read", slow_read)

    async def many() -> list[bytes]:
        waiting = [asyncio.ensure_future(cache.answer("ftjob-a", "p")) for _ in range(20)]
        await until(lambda: bool(calls))
        await asyncio.sleep(0.05)  # time for more reads to start, were they not shared
        release.set()
        return [answer.body for answer in await asyncio.gather(*waiting)]

    assert asyncio.run(many()) == [b"{}"] * 20
    assert calls == ["ftjob-a"]


def test_a_write_during_a_shared_read_starts_a_new_one(
    ttl: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = StatusCache()
    answers = iter([b"before", b"after"])
    started = threading.Event()
    release = threading.Event()

    def read(job_id: str, authorization: str | None, project: str | None
             ) -> tuple[str, bytes]:
        body = next(answers)
        if body == b"before":
            started.set()
            release.wait(5)
        return "p", body

    monkeypatch.setattr(status_module, "_read", read)

    async def scenario() -> tuple[bytes, bytes]:
        early = asyncio.ensure_future(cache.answer("ftjob-a", "p"))
        await until(started.is_set)
        cache.forget("ftjob-a")
        late = await cache.answer("ftjob-a", "p")  # must not wait for the read before the write
        release.set()
        return (await early).body, late.body

    assert asyncio.run(scenario()) == (b"before", b"after")


def test_an_answer_past_half_its_life_is_read_again_in_the_background(
    ttl: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    cache = StatusCache(clock=clock)
    cache.put("ftjob-a", "p", b"old", clock())
    clock.advance(0.6 * ttl)
    release = threading.Event()

    def read(job_id: str, authorization: str | None, project: str | None
             ) -> tuple[str, bytes]:
        release.wait(5)
        return "p", b"new"

    monkeypatch.setattr(status_module, "_read", read)

    async def scenario() -> list[bytes]:
        first = await cache.answer("ftjob-a", "p")  # served at once, the read goes on
        second = await cache.answer("ftjob-a", "p")  # one read in flight is enough
        assert len(cache._flights) == 1
        release.set()
        await until(lambda: not cache._flights)
        return [a.body for a in (first, second, await cache.answer("ftjob-a", "p"))]

    assert asyncio.run(scenario()) == [b"old", b"old", b"new"]


def test_the_last_answer_outlives_its_ttl_until_a_write(ttl: float) -> None:
    """What a status route may serve, marked stale, while the database is away."""
    clock = FakeClock()
    cache = StatusCache(clock=clock)
    cache.put("ftjob-a", "p", b"running", clock())
    clock.advance(2 * ttl)

    expired = cache.get("ftjob-a", "p")
    kept = cache.last("ftjob-a", 3 * ttl)
    too_old = cache.last("ftjob-a", ttl)
    cache.forget("ftjob-a")  # a cancel through this process
    after_write = cache.last("ftjob-a", 3 * ttl)

    assert expired is None
    assert kept == (("p", b"running"), 2 * ttl)
    assert too_old is None
    assert after_write is None


def test_a_read_from_before_a_write_never_becomes_the_last_answer(ttl: float) -> None:
    clock = FakeClock()
    cache = StatusCache(clock=clock)
    began = clock()
    clock.advance(2 * ttl)  # a read slower than the TTL: still worth keeping as the last
    cache.put("ftjob-a", "p", b"queued", began)
    assert cache.last("ftjob-a", 3 * ttl) == (("p", b"queued"), 2 * ttl)
    began = clock()
    clock.advance(0.001)
    cache.forget("ftjob-a")

    cache.put("ftjob-a", "p", b"running", began)

    assert cache.last("ftjob-a", 3 * ttl) is None
