"""The inference routes' model resolution cache (``api.model_cache``), and the read cache that
it shares with the job status route (``api.read_cache``).

The API runs in this process with no engine behind it: a request whose model resolved is
answered 503 (the engine is down), one whose model did not is answered 404 or 409 before
the engine is asked. A worker's write is a write to the database behind the API's back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api import served_models
from api.read_cache import ReadCache
from shared import storage
from shared.db import session_scope
from shared.errors import NotFound
from shared.ids import fine_tuned_model_name
from shared.models import Job
from tests.api.test_model_management import (
    adapter_files,
    add_checkpoint,
    add_source,
    error_of,
)
from tests.support.clock import FakeClock, install_clock

TTL = 60.0


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]  # project p
    other: dict[str, str]  # project q
    reads: list[str]  # the models resolved from the database, in order

    def complete(self, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post("/v1/completions", headers=headers or self.headers,
                                json={"model": model, "prompt": "hi", "max_tokens": 1})

    def resolved(self, model: str) -> None:
        """The request got past model resolution: the engine (down here) was asked."""
        r = self.complete(model)
        assert r.status_code == 503, r.text


@pytest.fixture
def api_with(started_app: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Callable[..., Api]]:
    """``api_with(**settings)``: the API, keys of projects p and q, and the models resolved
    from the database counted. The engine is a closed port."""
    from api.auth import create_key

    def start(**settings: Any) -> Api:
        client = started_app(engine_url="http://127.0.0.1:9", **settings)
        with session_scope() as s:
            key_p, key_q = create_key(s, "p")[1], create_key(s, "q")[1]
        reads: list[str] = []
        resolve = served_models.resolve_model

        def counted(session: Any, project: str, model: str) -> Any:
            reads.append(model)
            return resolve(session, project, model)

        monkeypatch.setattr(served_models, "resolve_model", counted)
        return Api(client, {"Authorization": f"Bearer {key_p}"},
                   {"Authorization": f"Bearer {key_q}"}, reads)

    yield start


# --------------------------------------------------------------------------- through the API
def test_a_model_is_read_once_per_ttl_and_refreshed_before_it_expires(
        api_with: Callable[..., Api], monkeypatch: pytest.MonkeyPatch) -> None:
    api = api_with(model_cache_seconds=TTL)
    clock = install_clock(monkeypatch)
    name = str(add_source().fine_tuned_model)

    for _ in range(3):
        api.resolved(name)
    assert api.reads == [name]

    clock.advance(0.6 * TTL)  # past half its life: served, and read again in the background
    api.resolved(name)
    wait_for(lambda: len(api.reads) == 2)
    clock.advance(0.45 * TTL)  # the first read expired, the background one has not
    api.resolved(name)
    assert len(api.reads) == 2

    clock.advance(1.1 * TTL)  # nothing fresh left: the request reads
    api.resolved(name)
    assert len(api.reads) == 3


def test_models_that_do_not_resolve_are_read_every_time(api_with: Callable[..., Api]) -> None:
    api = api_with(model_cache_seconds=TTL)
    running = add_source("running")
    name = fine_tuned_model_name(running.model, running.suffix, running.id)

    for _ in range(2):
        error_of(api.complete(name), 409, "model")
        error_of(api.complete("ft:nothing:s:ftjob-none"), 404, "model")
    assert len(api.reads) == 4

    # The worker finishes the job: usable at once, however recently it was refused.
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == running.id).values(
            status="succeeded", fine_tuned_model=name,
            adapter_dir=storage.adapter_key(running.id, 1)))
    adapter_files(storage.adapter_key(running.id, 1))
    api.resolved(name)


def test_deleting_a_model_forgets_it_at_once(api_with: Callable[..., Api]) -> None:
    api = api_with(model_cache_seconds=TTL)
    source = add_source()
    name = str(source.fine_tuned_model)
    checkpoint = add_checkpoint(source, 2)
    api.resolved(name)
    api.resolved(checkpoint)

    for model in (name, checkpoint):
        assert api.client.delete(f"/v1/models/{model}", headers=api.headers).status_code == 200
        error = error_of(api.complete(model), 404, "model")
        assert error["code"] == "model_not_found"


def test_a_cached_model_is_only_its_projects(api_with: Callable[..., Api]) -> None:
    api = api_with(model_cache_seconds=TTL)
    name = str(add_source().fine_tuned_model)
    api.resolved(name)

    error_of(api.complete(name, api.other), 404, "model")
    error_of(api.complete("ft:x:y:z", {"Authorization": "Bearer lf-nobody"}), 401, None)


def test_with_no_cache_every_request_reads(api_with: Callable[..., Api]) -> None:
    api = api_with(model_cache_seconds=0)
    name = str(add_source().fine_tuned_model)
    for _ in range(3):
        api.resolved(name)
    assert api.reads == [name] * 3


def test_a_base_model_resolves_from_the_projects_jobs(api_with: Callable[..., Api]) -> None:
    api = api_with(model_cache_seconds=TTL)
    source = add_source()
    api.resolved(source.model)
    api.resolved(source.model)
    assert api.reads == [source.model]
    error_of(api.complete(source.model, api.other), 404, "model")


# --------------------------------------------------------------------------- the read cache
def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    done = threading.Event()

    def poll() -> None:
        while not condition():
            if done.wait(0.01):
                return
        done.set()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert done.wait(timeout), "timed out"


def cache(clock: FakeClock) -> ReadCache[str, str]:
    return ReadCache(lambda: TTL, clock=clock)


def test_a_failed_refresh_drops_what_it_would_have_refreshed() -> None:
    clock = FakeClock()
    models = cache(clock)
    models.store("m", "old", clock())
    clock.advance(0.6 * TTL)

    def gone() -> str:
        raise NotFound("deleted", param="model")

    async def scenario() -> str:
        served = await models.fetch("m", gone)  # stored value, read again in the background
        while models._flights:
            await asyncio.sleep(0.01)
        return served

    assert asyncio.run(scenario()) == "old"
    assert models.lookup("m") is None  # the next request reads, and gets the 404 itself


def test_a_failed_read_of_a_value_not_the_readers_keeps_it() -> None:
    clock = FakeClock()
    answers: ReadCache[str, tuple[str, str]] = ReadCache(lambda: TTL, clock=clock)
    answers.store("job", ("p", "body"), clock())

    def not_yours() -> tuple[str, str]:
        raise NotFound("no such job", param="job_id")

    with pytest.raises(NotFound):
        asyncio.run(answers.fetch("job", not_yours, usable=lambda a: a[0] == "q",
                                  flight=("job", "q")))
    assert answers.lookup("job") == ("p", "body")


def test_a_read_that_began_before_a_forget_is_not_stored() -> None:
    clock = FakeClock()
    models = cache(clock)
    began = clock()
    clock.advance(0.001)
    models.forget("m")
    models.store("m", "stale", began)
    assert models.lookup("m") is None
    models.store("m", "fresh", clock())
    assert models.lookup("m") == "fresh"
