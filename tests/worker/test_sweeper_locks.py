"""The sweeper on PostgreSQL when a job's row is held by a transaction that does not end: a
worker frozen in the middle of a write (a paused VM, SIGSTOP) keeps its row lock until it runs
again or dies. The sweep must go on with the other jobs instead of waiting on that row, and
re-queue the job once the row is free."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update

from shared import lifecycle
from shared.db import session_scope
from shared.lifecycle import JobStatus
from shared.models import Job
from tests.support.backends import REDIS_POSTGRES, Backend

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LEASE_SECONDS = 30
# How long the sweep may take before the test calls it stuck: a sweep of two jobs takes
# milliseconds, one stuck on a lock never ends.
STUCK_AFTER_S = 60


@pytest.fixture
def backend() -> Iterator[Backend]:
    made = Backend.provision(REDIS_POSTGRES)
    try:
        yield made
    finally:
        made.cleanup()


def stale_running_job(name: str) -> str:
    """A job claimed by a worker whose heartbeat is older than the lease."""
    job_id = f"ftjob-{name}-{time.monotonic_ns()}"
    with session_scope() as s:
        s.add(Job(id=job_id, project="p", created_at=0, model="m", status=JobStatus.QUEUED,
                  training_file="file-x", spec={}, seed=0))
    assert lifecycle.claim(job_id, f"worker-of-{name}") is not None
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=time.time() - 10 * LEASE_SECONDS))
    return job_id


def status(job_id: str) -> str:
    with session_scope() as s:
        return str(s.scalar(select(Job.status).where(Job.id == job_id)))


def test_a_row_held_by_a_frozen_transaction_does_not_stop_the_sweep(
    backend: Backend, settings_env: Callable[..., Any], caplog: pytest.LogCaptureFixture,
) -> None:
    from shared.migrate import upgrade
    from worker.sweeper import sweep

    env = {k.removeprefix("LORAFLEET_").lower(): v for k, v in backend.env.items()}
    settings_env(**env, lease_seconds=LEASE_SECONDS)
    upgrade()
    frozen, other = stale_running_job("frozen"), stale_running_job("other")

    # The frozen worker's heartbeat: begun, the row updated, never committed.
    holder = create_engine(env["database_url"])
    conn = holder.connect()
    pool = ThreadPoolExecutor(1)
    try:
        conn.execute(text("UPDATE jobs SET heartbeat_at = :t WHERE id = :id"),
                     {"t": time.time(), "id": frozen})
        with caplog.at_level(logging.WARNING):
            pool.submit(sweep).result(timeout=STUCK_AFTER_S)
        assert status(other) == JobStatus.QUEUED  # released, and sent once due
        assert status(frozen) == JobStatus.RUNNING  # left for a later sweep
        assert any(frozen in r.getMessage() and "another transaction holds its row"
                   in r.getMessage() for r in caplog.records)
    finally:
        conn.close()  # the frozen worker dies: its transaction ends (and a stuck sweep with it)
        holder.dispose()
        pool.shutdown()
    sweep()
    assert status(frozen) == JobStatus.QUEUED
