"""Redis and PostgreSQL misbehaving around running jobs: a visibility timeout shorter than a
job, a short database outage, and chaos (workers killed, one in the middle of a checkpoint
save, Redis and the API restarted) with several jobs competing for two workers.

The broker is a private ``redis-server`` that the tests may restart; the database is a fresh
PostgreSQL database. Every worker here takes a second per checkpoint save (see
``slow_save/sitecustomize.py``), as a real model does, so that a kill can land inside one.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shared import storage
from shared.storage import folders
from tests.resilience.conftest import (
    JOB,
    assert_never_concurrent,
    attempts,
    ensure_workers,
    job_row,
    owner_index,
    progress_step,
    restart_api,
    slow_save_env,
    start_stack,
    wait_until,
)
from tests.support import (
    REDIS_POSTGRES,
    Stack,
    create_job,
    list_all_events,
    upload_dialogsum,
    wait_for_status,
)
from tests.support.backends import postgres_url
from tests.support.servers import PrivateRedis

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.postgres]

VISIBILITY_TIMEOUT = 2
GRACE = 0.3  # preempt_grace_seconds: shorter than a (slowed) checkpoint save


@pytest.fixture(scope="module")
def stack(make_module_stack: Any, tiny_model: Path, private_redis: PrivateRedis) -> Stack:
    return start_stack(make_module_stack, tiny_model, backend=REDIS_POSTGRES,
                       env={"LORAFLEET_BROKER_URL": private_redis.url, **slow_save_env(1.0)},
                       broker_visibility_timeout=VISIBILITY_TIMEOUT, lease_seconds=6,
                       max_attempts=4, preempt_grace_seconds=GRACE)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.openai()


@pytest.fixture(scope="module")
def file_id(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 48).id


def test_job_longer_than_the_visibility_timeout_trains_once(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path,
        private_redis: PrivateRedis) -> None:
    """Redis gives an unacknowledged message to a consumer again once it is older than the
    visibility timeout (kombu restores such messages when a consumer connects, and every
    ``unacked_restore_interval``). The second delivery of a running job's message must not
    start a second training."""
    import redis

    ensure_workers(stack, 2)
    job = create_job(client, str(tiny_model), file_id, **{**JOB, "max_steps": 24,
                                                            "save_steps": 8})
    wait_until(lambda: job_row(stack, job.id).status == "running", what="the job to start")
    time.sleep(VISIBILITY_TIMEOUT + 1)
    # A network blip: every consumer reconnects and restores the messages left unacked.
    conn = redis.Redis(port=private_redis.port)
    try:
        conn.client_kill_filter(_type="normal", skipme=True)
    finally:
        conn.close()
    redelivered = wait_until(
        lambda: any(f"job {job.id}: not claimable" in p.log() for p in stack.workers),
        timeout=120, what="the message to be delivered again")

    done = wait_for_status(client, job.id, "succeeded", timeout=240)
    rows = attempts(stack, job.id)

    assert redelivered
    assert done.attempt == 1
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "succeeded")]


def test_short_database_outage(stack: Stack, client: openai.OpenAI, file_id: str,
                               tiny_model: Path) -> None:
    """The job's database refuses connections for a few seconds (and drops those open) while
    the job trains: heartbeats and progress wait it out, the job goes on and succeeds in its
    first attempt."""
    job = create_job(client, str(tiny_model), file_id, **JOB)
    wait_until(lambda: progress_step(stack, job.id) >= 2, what="step 2")
    database = make_url(stack.database_url).database
    admin = create_engine(postgres_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :db"), {"db": database})
            time.sleep(2.5)
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()
    during = job_row(stack, job.id)

    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    rows = attempts(stack, job.id)
    noticed = sum("heartbeat failed" in p.log() for p in stack.workers)

    assert during.status == "running" and during.attempt == 1, "trained through the outage"
    assert done.attempt == 1
    assert [r.outcome for r in rows] == ["succeeded"]
    assert job_row(stack, job.id).failures == 0
    assert noticed, "the worker did see the database go away"


def test_sigterm_exits_within_the_grace_period(stack: Stack, client: openai.OpenAI,
                                               file_id: str, tiny_model: Path) -> None:
    """A preemption checkpoint that cannot be written within ``preempt_grace_seconds`` (here
    every save takes a second) does not hold the worker: it exits, and the job comes back
    through its lease, from the last checkpoint that was complete."""
    ensure_workers(stack, 2)
    job = create_job(client, str(tiny_model), file_id, **JOB)
    wait_until(lambda: progress_step(stack, job.id) >= 2, what="step 2")
    index = owner_index(stack, job.id)
    assert index is not None

    exit_code = stack.stop_worker(index, signal.SIGTERM, wait=30)
    stack.add_worker(wait=False)
    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    rows = assert_never_concurrent(stack, job.id)
    log = stack.workers[index].log()

    assert exit_code is not None, "the worker exited by itself"
    assert "still busy" in log and "after SIGTERM; killing it" in log
    assert [r.outcome for r in rows] == ["lost", "succeeded"]
    assert done.attempt == 2


def test_chaos(stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path,
               private_redis: PrivateRedis) -> None:
    """Four jobs on two workers. Workers are SIGKILLed three times (once while a checkpoint
    is being saved, twice at random moments), Redis is restarted (losing every queued
    message) and so is the API; killed workers are replaced. Every job succeeds, and the
    fencing record shows that no job ever trained on two workers at once."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ensure_workers(stack, 2)
    jobs = [create_job(client, str(tiny_model), file_id, **{**JOB, "seed": 100 + i})
            for i in range(4)]
    ids = [j.id for j in jobs]

    # 1. In the middle of a checkpoint save: kill the worker while a staging folder exists.
    saving = wait_until(lambda: _saving(stack, ids), interval=0.02,
                        what="a checkpoint save in progress")
    job_saving, staging = saving
    step_saving = int(next(staging.iterdir()).name.removeprefix("checkpoint-"))
    index = owner_index(stack, job_saving)
    assert index is not None
    killed_attempt = job_row(stack, job_saving).attempt
    stack.kill_worker(index, signal.SIGKILL)
    stack.add_worker(wait=False)
    left_behind = staging.exists()
    listed_after_kill = [c.step_number for c in
                         client.fine_tuning.jobs.checkpoints.list(job_saving).data]

    # 2. Redis loses its queue (the jobs waiting for a worker lose their wake-up call).
    private_redis.restart(down_for=1.0)

    # 3. and 4. Two kills at random moments, with an API restart in between.
    _kill_a_busy_worker(stack, ids, rng)
    restart_api(stack)
    client = stack.openai()
    _kill_a_busy_worker(stack, ids, rng)

    done = [wait_for_status(client, i, "succeeded", timeout=300) for i in ids]
    records = {i: assert_never_concurrent(stack, i) for i in ids}
    events = list_all_events(client, job_saving)
    resumes = {e.data["attempt"]: e.data["step"] for e in events
               if e.message.startswith("Resumed from ")}

    store = stack.store()
    recorded = {r.path for r in stack.sql("SELECT path FROM checkpoints WHERE job_id = :id "
                                          "AND NOT deleted", id=job_saving)}
    left_in_store = {k.rsplit("/", 1)[0] for k in store.list(
        f"jobs/{job_saving}/attempt-{killed_attempt}/") if "/checkpoint-" in k}

    assert all(j.status == "succeeded" for j in done), f"seed {seed}"
    assert sum(len(r) - 1 for r in records.values()) >= 3, "three attempts were interrupted"
    assert left_behind, "the killed save left its staging folder behind, on its worker's disk"
    assert step_saving not in listed_after_kill, "a half-saved checkpoint is never listed"
    # It never reached storage, and the killed attempt left there only what is recorded.
    assert not folders.exists(store, storage.checkpoint_key(job_saving, killed_attempt,
                                                            step_saving))
    assert left_in_store <= recorded
    # The next attempt resumed from an earlier checkpoint (or from scratch: none before it).
    assert resumes.get(killed_attempt + 1, 0) < step_saving


def _saving(stack: Stack, ids: list[str]) -> tuple[str, Path] | None:
    """A job with a checkpoint save in progress, and the staging folder it writes to (on its
    worker's disk, in the worker's cache folder, before the checkpoint is committed)."""
    for job_id in ids:
        for staging in stack.cache_root.glob(f"*/work/{job_id}/attempt-*/checkpoints/"
                                             ".staging-*"):
            try:
                if any(staging.iterdir()):
                    return job_id, staging
            except FileNotFoundError:
                continue
    return None


def _kill_a_busy_worker(stack: Stack, ids: list[str], rng: random.Random) -> str:
    """After a random pause, SIGKILL a worker that trains one of ``ids`` and start a
    replacement; returns the job it was training."""
    time.sleep(rng.uniform(0.5, 3.0))
    busy = wait_until(lambda: [(i, j) for j in ids if job_row(stack, j).status == "running"
                               and (i := owner_index(stack, j)) is not None],
                      what="a worker with a job")
    index, job_id = rng.choice(busy)
    stack.kill_worker(index, signal.SIGKILL)
    stack.add_worker(wait=False)
    return job_id
