"""The fleet rides out its dependencies: PostgreSQL and Redis each killed and started again
while jobs train and clients poll.

The API and two workers run on a PostgreSQL server and a Redis server of this test's own
(:mod:`tests.support.servers`), never the machine's. Pollers keep asking the API for job
statuses and the other read routes throughout (:mod:`tests.support.pollers`). Every answer
counts: an endpoint that needs a dependency that is away answers 503 with ``Retry-After`` in
OpenAI's error shape, one that does not keeps answering 200, and no request is ever answered
500 or left without an answer. Every job succeeds, and so does the next one, without any
lorafleet process being restarted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.resilience.conftest import start_stack, wait_until
from tests.support import Stack, create_job, upload_dialogsum, wait_for_status
from tests.support.jobs import dialogsum_records, jsonl_bytes
from tests.support.pollers import Answer, Pollers, check_503
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


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivatePostgres,
                                                                        PrivateRedis]]:
    with (PrivatePostgres() as pg,
          PrivateRedis(tmp_path_factory.mktemp("redis")) as redis):
        yield pg, redis


@pytest.fixture(scope="module")
def stack(servers: tuple[PrivatePostgres, PrivateRedis], make_module_stack: Any,
          tiny_model: Path) -> Stack:
    # ``servers`` first: they stop after the stack's processes.
    pg, redis = servers
    return start_stack(make_module_stack, tiny_model, workers=2,
                       env={"LORAFLEET_DATABASE_URL": pg.database_url("lorafleet"),
                            "LORAFLEET_BROKER_URL": redis.url},
                       lease_seconds=15)


def test_postgres_and_redis_restarts(stack: Stack, tiny_model: Path,
                                     servers: tuple[PrivatePostgres, PrivateRedis]) -> None:
    pg, redis = servers
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
        noticed = _log_marks(stack, "Connection to broker lost")
        redis.kill()
        down = time.monotonic()
        # A job created meanwhile is stored whole; the sweeper sends it once Redis is back.
        created = http.post("/v1/fine_tuning/jobs", json={
            "model": str(tiny_model), "training_file": file_id, **TRAINING, "seed": 10})
        health = _wait_health(http, "broker")
        _hold_outage(stack, polls, down, "Connection to broker lost", noticed)
        redis.start()
        assert created.status_code == 200, created.text
        jobs.append(created.json()["id"])

        # 2. PostgreSQL stops at once (-m immediate) under a training job, and starts again.
        jobs.append(create_job(client, str(tiny_model), file_id, **TRAINING, seed=11).id)
        _wait_training(stack, jobs[-1:])
        noticed = _log_marks(stack, "sweep failed")
        pg.stop()
        down = time.monotonic()
        refused_job = http.post("/v1/fine_tuning/jobs", json={
            "model": str(tiny_model), "training_file": file_id, **TRAINING})
        refused_file = http.post("/v1/files", data={"purpose": "fine-tune"}, files={
            "file": ("late.jsonl", jsonl_bytes(dialogsum_records(8)), "application/jsonl")})
        db_health = _wait_health(http, "database")
        _hold_outage(stack, polls, down, "sweep failed", noticed)
        during_pg = polls.answers(since=down)
        pg.start()

        # Afterwards, a client as the SDK's users have it: it retries a 503 after Retry-After.
        client = stack.openai(max_retries=5)
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
    assert final_health.status_code == 200, final_health.text
    # While PostgreSQL was away, statuses read before were served, marked as such.
    assert any(a.stale and a.status == 200 for a in during_pg), _describe(during_pg)
    assert any(a.status == 503 for a in during_pg), _describe(during_pg)
    # Nothing was written half: what was refused does not exist.
    for refused in (refused_job, refused_file):
        assert refused.status_code == 503 and check_503(refused) is None, refused.text
    assert listed == {*jobs, after}
    assert files == [file_id]
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
            f"/v1/files/{file_id}", "/health", "/console", "/metrics"]


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


def _hold_outage(stack: Stack, polls: Pollers, down: float, mark: str,
                 before: list[int]) -> None:
    """Keep a dependency away for :data:`OUTAGE_SECONDS` at least, and until the pollers
    got :data:`POLLS_PER_OUTAGE` answers and every worker logged ``mark`` once more."""
    polls.wait_for(lambda a: len(a) >= POLLS_PER_OUTAGE, since=down, what="polls")
    wait_until(lambda: all(n > m for n, m in zip(_log_marks(stack, mark), before,
                                                  strict=True)),
               timeout=120, interval=0.2, what=f"every worker to log {mark!r}")
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

