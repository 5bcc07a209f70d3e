"""The fleet rides out its dependencies: Redis, PostgreSQL and the object store each killed
and started again while jobs train and clients poll.

The API and two workers run on a PostgreSQL server, a Redis server and a SeaweedFS (S3) server
of this test's own (:mod:`tests.support.servers`, :mod:`tests.support.seaweedfs`), never the
machine's or the session's. Pollers keep asking the API for job statuses, a file's content and
the other read routes throughout (:mod:`tests.support.pollers`). Every answer counts: an
endpoint that needs a dependency that is away answers 503 with ``Retry-After`` in OpenAI's
error shape, one that does not keeps answering 200, and no request is ever answered 500 or left
without an answer. Checkpoint commits wait for the store and retry; every job succeeds, and so
does the next one, without any lorafleet process being restarted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.resilience.conftest import start_stack, wait_until
from tests.support import Stack, create_job, upload_dialogsum, wait_for_status
from tests.support.jobs import dialogsum_records, jsonl_bytes
from tests.support.pollers import Answer, Pollers, check_503, error_code
from tests.support.seaweedfs import SeaweedFS
from tests.support.servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.postgres]

# Long enough that a job is still training when a fault lands, short on a CPU.
TRAINING: dict[str, Any] = {"max_steps": 24, "save_steps": 6, "logging_steps": 2,
                            "max_length": 512, "batch_size": 4, "lora": {"r": 4, "alpha": 8}}
# An outage lasts at least this long (the operator's trial stopped PostgreSQL for 6 s), and
# until the pollers got this many answers and every lorafleet process noticed it.
OUTAGE_SECONDS = 6.0
POLLS_PER_OUTAGE = 60
# Routes that need no dependency: they answer 200 whatever is away.
INDEPENDENT = ("/console", "/metrics")
# A job's status, the job list and events are read from the database alone: they answer 200
# while the store is away.
STORELESS = re.compile(r"/v1/fine_tuning/jobs(\?|/[^/]+$|/[^/]+/events)")


@dataclass(frozen=True)
class Servers:
    """The dependencies of this test's own, which it kills and starts again."""

    pg: PrivatePostgres
    redis: PrivateRedis
    s3: SeaweedFS


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with (PrivatePostgres() as pg,
          PrivateRedis(tmp_path_factory.mktemp("redis")) as redis,
          SeaweedFS(tmp_path_factory.mktemp("s3")) as s3):
        yield Servers(pg, redis, s3)


@pytest.fixture(scope="module")
def stack(servers: Servers, make_module_stack: Any, tiny_model: Path) -> Stack:
    # ``servers`` first: they stop after the stack's processes.
    return start_stack(make_module_stack, tiny_model, workers=2, storage="s3", s3=servers.s3,
                       env={"LORAFLEET_DATABASE_URL": servers.pg.database_url("lorafleet"),
                            "LORAFLEET_BROKER_URL": servers.redis.url},
                       lease_seconds=15)


def test_postgres_redis_and_store_restarts(stack: Stack, tiny_model: Path,
                                           servers: Servers) -> None:
    pg, redis, s3 = servers.pg, servers.redis, servers.s3
    client = stack.openai()
    file_id = upload_dialogsum(client, 48).id
    pids = _pids(stack)
    jobs = [create_job(client, str(tiny_model), file_id, **TRAINING, seed=i).id
            for i in range(4)]
    polls = Pollers(stack.base_url, stack.key, paths=lambda: _paths(jobs, file_id),
                    allowed=lambda path: {200} if path in INDEPENDENT else {200, 503},
                    pause=0.05)
    http = stack.http()

    with polls.running(threads=3):
        # 1. Redis dies (SIGKILL) under a training job and comes back empty.
        _wait_training(stack, jobs)
        noticed = _every_worker_logs(stack, "Connection to broker lost")
        redis.kill()
        down = time.monotonic()
        # A job created meanwhile is stored whole; the sweeper sends it once Redis is back.
        created = http.post("/v1/fine_tuning/jobs", json={
            "model": str(tiny_model), "training_file": file_id, **TRAINING, "seed": 10})
        health = _wait_health(http, "broker")
        _hold_outage(polls, down, noticed, "every worker to lose the broker")
        redis.start()
        assert created.status_code == 200, created.text
        jobs.append(created.json()["id"])

        # 2. PostgreSQL stops at once (-m immediate) under a training job, and starts again.
        jobs.append(create_job(client, str(tiny_model), file_id, **TRAINING, seed=11).id)
        _wait_training(stack, jobs)
        noticed = _every_worker_logs(stack, "sweep failed")
        pg.stop()
        down = time.monotonic()
        refused_job = http.post("/v1/fine_tuning/jobs", json={
            "model": str(tiny_model), "training_file": file_id, **TRAINING})
        refused_file = _upload(http, "late.jsonl")
        db_health = _wait_health(http, "database")
        _hold_outage(polls, down, noticed, "every worker to lose the database")
        during_pg = polls.answers(since=down)
        pg.start()
        # From now on, a client as the SDK's users have it: it retries a 503 after Retry-After.
        client = stack.openai(max_retries=5)

        # 3. The object store dies (SIGKILL) under a training job, and starts again on the same
        #    ports and data folder.
        #    The job it dies under is whichever trains then: the queue holds several, and
        #    which one a worker has reached depends on the machine's speed.
        jobs.append(create_job(client, str(tiny_model), file_id, **TRAINING, seed=13).id)
        first = wait_for_status(client, jobs[0], "succeeded", timeout=600)
        stored = _wait_training(stack, jobs[1:])
        retried = _commit_retries(stack, stored)
        s3.kill()
        down = time.monotonic()
        refused_upload = _upload(http, "away.jsonl")
        # A deletion is decided in the database; a worker deletes the objects later.
        deleted_model = http.delete(f"/v1/models/{first.fine_tuned_model}")
        # The API checks a new job's file from its node cache: no need of the store.
        created_away = http.post("/v1/fine_tuning/jobs", json={
            "model": str(tiny_model), "training_file": file_id, **TRAINING, "seed": 14})
        store_health = _wait_health(http, "storage")
        _hold_outage(polls, down, lambda: _commit_retries(stack, stored) > retried,
                     f"the checkpoint commit of {stored} to retry")
        during_store = polls.answers(since=down)
        s3.start()
        assert created_away.status_code == 200, created_away.text
        jobs.append(created_away.json()["id"])
        adapter = f"lorafleet/{stack.store().key_of(first.adapter_path)}/"
        wait_until(lambda: s3.keys(stack.bucket, adapter) == [], timeout=300, interval=0.5,
                   what="a worker to delete the objects of the deleted model")

        done = [wait_for_status(client, j, "succeeded", timeout=600) for j in jobs]
        after = create_job(client, str(tiny_model), file_id, **TRAINING, seed=12).id
        next_job = wait_for_status(client, after, "succeeded", timeout=300)
        final_health = http.get("/health")
    tally = polls.tally()
    listed = {j.id for j in client.fine_tuning.jobs.list(limit=100).data}
    files = [f.id for f in client.files.list(purpose="fine-tune").data]
    logs = {p.name: p.log() for p in [stack.api, *stack.workers] if p is not None}

    print(f"pollers: {tally}")
    assert tally.no_answer == [], f"requests without an answer: {tally}"
    assert tally.errors == [], f"answers neither 200 nor a dependency's 503: {tally}"
    assert tally.bad_503 == [], f"503s that break the contract: {tally}"
    assert health["broker"] != "ok" and health["database"] == "ok", health
    assert db_health["database"] != "ok", db_health
    assert store_health["storage"] != "ok", store_health
    assert store_health["database"] == store_health["broker"] == "ok", store_health
    assert final_health.status_code == 200, final_health.text
    # While PostgreSQL was away, statuses read before were served, marked as such.
    assert any(a.stale and a.status == 200 for a in during_pg), _describe(during_pg)
    assert any(a.status == 503 for a in during_pg), _describe(during_pg)
    # While the store was away, what needs only the database answered as usual, and what
    # needs the store (a file's content) answered 503 naming the store.
    storeless = [a for a in during_store if STORELESS.search(a.path)]
    assert storeless and all(a.status == 200 and not a.stale for a in storeless), \
        _describe([a for a in storeless if a.status != 200 or a.stale])
    refusals = [a for a in during_store if a.status == 503 and a.path != "/health"]
    assert any(a.path.endswith("/content") for a in refusals), _describe(during_store)
    assert {a.code for a in refusals} == {"storage_unavailable"}, _describe(refusals)
    # Nothing was written half: what was refused does not exist.
    for refused in (refused_job, refused_file, refused_upload):
        assert refused.status_code == 503 and check_503(refused) is None, refused.text
    assert error_code(refused_upload) == "storage_unavailable", refused_upload.text
    assert deleted_model.status_code == 200, deleted_model.text
    assert stack.sql("SELECT key FROM storage_deletions") == []
    assert listed == {*jobs, after}
    assert files == [file_id]
    stored_files = {r.path for r in stack.sql("SELECT path FROM files")}
    assert set(s3.keys(stack.bucket, "lorafleet/files/")) == {
        f"lorafleet/{path}" for path in stored_files}
    assert s3.client().list_multipart_uploads(Bucket=stack.bucket).get("Uploads") is None
    # The job under which the store went away rode it out: its commits waited and retried,
    # and its first attempt went on to the end.
    assert next(j for j in done if j.id == stored).attempt == 1
    assert all(j.status == "succeeded" for j in done)
    assert next_job.status == "succeeded"
    assert _pids(stack) == pids, "no lorafleet process was restarted"
    for name, text in logs.items():
        assert "Exception in ASGI application" not in text, name
        assert "Exception in thread" not in text, name


def _paths(jobs: list[str], file_id: str) -> list[str]:
    """What the pollers ask for, the statuses of the newest jobs most often."""
    newest = jobs[-3:]
    statuses = [f"/v1/fine_tuning/jobs/{j}" for j in newest]
    return [*statuses, "/v1/fine_tuning/jobs?limit=5", *statuses,
            f"/v1/fine_tuning/jobs/{newest[-1]}/events?limit=5", *statuses, "/v1/models",
            f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", "/health", "/console",
            "/metrics"]


def _upload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/files", data={"purpose": "fine-tune"}, files={
        "file": (name, jsonl_bytes(dialogsum_records(8)), "application/jsonl")})


def _pids(stack: Stack) -> list[int]:
    """The live lorafleet processes: the API, the workers and their pool processes."""
    return [pid for p in [stack.api, *stack.workers] if p is not None and p.alive()
            for pid in (p.pid, *p.child_pids())]


def _wait_training(stack: Stack, jobs: list[str]) -> str:
    """Wait until one of ``jobs`` trains (step 2 or later); returns it."""
    def training() -> str | None:
        rows = stack.sql("SELECT id, progress FROM jobs WHERE status = 'running' "
                         "AND id = ANY(:ids)", ids=jobs)
        return next((r.id for r in rows if (r.progress or {}).get("step", 0) >= 2), None)

    return wait_until(training, timeout=300, interval=0.2, what="a job training")


def _log_marks(stack: Stack, mark: str) -> list[int]:
    """How many times each worker has logged ``mark`` so far."""
    return [p.log().count(mark) for p in stack.workers]


def _every_worker_logs(stack: Stack, mark: str) -> Callable[[], bool]:
    """Whether every worker has logged ``mark`` once more since this call."""
    before = _log_marks(stack, mark)
    return lambda: all(n > m for n, m in zip(_log_marks(stack, mark), before, strict=True))


def _commit_retries(stack: Stack, job_id: str) -> int:
    """How many times the workers have logged a failed commit of a checkpoint or the adapter
    of ``job_id`` that they will try again (:func:`worker.commits.with_backoff`)."""
    retry = re.compile(rf"committing (checkpoint-\d+|the adapter) of {job_id}: .*; retrying in ")
    return sum(len(retry.findall(p.log())) for p in stack.workers)


def _hold_outage(polls: Pollers, down: float, noticed: Callable[[], bool], what: str) -> None:
    """Keep a dependency away for :data:`OUTAGE_SECONDS` at least, and until the pollers
    got :data:`POLLS_PER_OUTAGE` answers and ``noticed()`` (the lorafleet processes met the
    outage)."""
    polls.wait_for(lambda a: len(a) >= POLLS_PER_OUTAGE, since=down, what="polls")
    wait_until(noticed, timeout=300, interval=0.2, what=what)
    time.sleep(max(0.0, down + OUTAGE_SECONDS - time.monotonic()))


def _wait_health(http: httpx.Client, part: str) -> dict[str, Any]:
    """Wait until ``/health`` answers 503 naming ``part`` as down; returns its body."""
    def down() -> dict[str, Any] | None:
        answer = http.get("/health")
        body = answer.json()
        return body if answer.status_code == 503 and body.get(part) != "ok" else None

    return wait_until(down, timeout=120, interval=0.1, what=f"/health to report the {part}")


def _describe(answers: list[Answer]) -> str:
    return "; ".join(f"{a}{' stale' if a.stale else ''}" for a in answers[:30])

