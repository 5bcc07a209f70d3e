"""Job metrics on SQLite, in one process: the jobs table read at scrape time (statuses, queue
depth, oldest queued job, the cache), the lifecycle counted at its transitions, and webhook
sends by outcome."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select, update

from api.metrics import JobsCollector
from shared import lifecycle, outbox
from shared.db import session_scope
from shared.lifecycle import JobStatus
from shared.models import Job, WebhookEndpoint
from tests.metrics.conftest import sample, scraped, value
from tests.webhooks.receiver import Receiver

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="


@pytest.fixture
def db(settings_env: Callable[..., Any]) -> None:
    from shared.migrate import upgrade

    settings_env(max_attempts=3, retry_backoff_seconds=10, webhook_backoff_seconds=0.05,
                 webhook_allow_private_targets="true")
    upgrade()


def add_job(status: JobStatus, created_at: int = 0, project: str = "p") -> str:
    job_id = f"ftjob-{status}-{time.monotonic_ns()}"
    with session_scope() as s:
        s.add(Job(id=job_id, project=project, created_at=created_at, model="m", status=status,
                  training_file="file-x", spec={}, seed=0))
    return job_id


def row(job_id: str) -> Job:
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        s.expunge(job)
        return job


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(collector: JobsCollector) -> dict[Any, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return scraped(generate_latest(registry).decode())


# --------------------------------------------------------------------------- the jobs table
def test_jobs_by_status_queue_depth_and_the_oldest_queued_job(db: None) -> None:
    for status, created in [(JobStatus.QUEUED, 1_000), (JobStatus.QUEUED, 1_300),
                            (JobStatus.QUEUED, 1_200), (JobStatus.RUNNING, 500),
                            (JobStatus.SUCCEEDED, 100), (JobStatus.SUCCEEDED, 200),
                            (JobStatus.VALIDATING_FILES, 10)]:
        add_job(status, created, project="a" if created % 200 else "b")
    samples = scrape(JobsCollector(clock=Clock(1_600.0)))

    assert {status.value: sample(samples, "lorafleet_jobs", status=status.value)
            for status in JobStatus} == {
        "validating_files": 1, "queued": 3, "running": 1, "paused": 0, "succeeded": 2,
        "failed": 0, "cancelled": 0}
    assert sample(samples, "lorafleet_queue_depth") == 3
    # Queued the longest: created at 1000, read at 1600. Other statuses do not count.
    assert sample(samples, "lorafleet_oldest_queued_job_age_seconds") == 600


def test_an_empty_queue_has_depth_and_age_zero(db: None) -> None:
    add_job(JobStatus.RUNNING, 5)
    samples = scrape(JobsCollector(clock=Clock(100.0)))
    assert sample(samples, "lorafleet_queue_depth") == 0
    assert sample(samples, "lorafleet_oldest_queued_job_age_seconds") == 0
    assert sample(samples, "lorafleet_jobs", status="running") == 1


def test_one_read_answers_the_scrapes_within_its_cache_time(db: None) -> None:
    clock = Clock(1_000.0)
    collector = JobsCollector(clock=clock, cache_seconds=2.0)
    registry = CollectorRegistry()
    registry.register(collector)

    def depth() -> float:
        return sample(scraped(generate_latest(registry).decode()), "lorafleet_queue_depth")

    add_job(JobStatus.QUEUED, 900)
    assert depth() == 1
    add_job(JobStatus.QUEUED, 950)
    clock.now += 1.5
    assert depth() == 1  # the read of 1.5 s ago
    clock.now += 1.0
    assert depth() == 2
    # The age is computed at each scrape, also from a cached read.
    clock.now += 1.0
    add_job(JobStatus.QUEUED, 10)
    assert sample(scraped(generate_latest(registry).decode()),
                  "lorafleet_oldest_queued_job_age_seconds") == clock.now - 900


def test_a_database_that_is_away_leaves_the_job_metrics_out(
        settings_env: Callable[..., Any], tmp_path: Any) -> None:
    settings_env(database_url=f"sqlite:///{tmp_path}/no/such/folder/db.sqlite")
    registry = CollectorRegistry()
    registry.register(JobsCollector())
    assert "lorafleet_jobs" not in generate_latest(registry).decode()


# --------------------------------------------------------------------------- the lifecycle
@pytest.fixture
def counts() -> Iterator[Callable[[], dict[str, float]]]:
    """The lifecycle counters' increase since the test started."""
    def read() -> dict[str, float]:
        return {
            "attempts": value("lorafleet_job_attempts_total"),
            "preemptions": value("lorafleet_job_preemptions_total"),
            "lease_losses": value("lorafleet_job_lease_losses_total"),
            **{f"requeued_{r}": value("lorafleet_job_requeues_total", reason=r)
               for r in ("preempted", "failure", "lease_lost")},
            **{f"ended_{s}": value("lorafleet_job_duration_seconds_count", status=s)
               for s in ("succeeded", "failed", "cancelled")},
        }

    before = read()
    yield lambda: {k: v - before[k] for k, v in read().items() if v != before[k]}


def test_each_transition_is_counted_once_where_it_happens(
        db: None, counts: Callable[[], dict[str, float]]) -> None:
    job_id = add_job(JobStatus.QUEUED)
    claim = lifecycle.claim(job_id, "w1")
    assert claim is not None and lifecycle.claim(job_id, "w2") is None  # the loser: no count
    assert lifecycle.release(job_id, claim.attempt, reason="OOM", count_failure=True) == (
        JobStatus.QUEUED)
    assert counts() == {"attempts": 1, "requeued_failure": 1}

    with session_scope() as s:  # due at once, not after the backoff
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    claim = lifecycle.claim(job_id, "w1")
    assert claim is not None
    assert lifecycle.preempt(job_id, claim.attempt, reason="node going away", step=3) == (
        JobStatus.QUEUED)
    assert lifecycle.preempt(job_id, claim.attempt, reason="again", step=3) is None
    assert counts() == {"attempts": 2, "requeued_failure": 1, "preemptions": 1,
                        "requeued_preempted": 1}

    claim = lifecycle.claim(job_id, "w3")
    assert claim is not None
    assert lifecycle.release_stale(row(job_id), "Worker w3 lost", 4) == JobStatus.QUEUED
    assert counts() == {"attempts": 3, "requeued_failure": 1, "preemptions": 1,
                        "requeued_preempted": 1, "lease_losses": 1, "requeued_lease_lost": 1}


def test_a_job_that_ends_observes_its_time_since_creation(
        db: None, counts: Callable[[], dict[str, float]]) -> None:
    created = int(time.time()) - 120
    job_id = add_job(JobStatus.QUEUED, created)
    seconds = value("lorafleet_job_duration_seconds_sum", status="succeeded")
    claim = lifecycle.claim(job_id, "w1")
    assert claim is not None
    assert lifecycle.finish(job_id, claim.attempt, JobStatus.SUCCEEDED, message="done")
    assert not lifecycle.finish(job_id, claim.attempt, JobStatus.SUCCEEDED, message="again")

    waiting = add_job(JobStatus.QUEUED, created)
    with session_scope() as s:
        lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == waiting)))

    assert counts() == {"attempts": 1, "ended_succeeded": 1, "ended_cancelled": 1}
    observed = value("lorafleet_job_duration_seconds_sum", status="succeeded") - seconds
    assert 120 <= observed < 120 + 60
    # In the bucket of up to 5 minutes, not in the one of up to 1.
    assert value("lorafleet_job_duration_seconds_bucket", status="succeeded", le="300.0") >= 1


# --------------------------------------------------------------------------- webhooks
def test_webhook_sends_are_counted_by_outcome(db: None) -> None:
    receiver = Receiver(fail_first={"/flaky": 1}).start()
    try:
        job_id = add_job(JobStatus.SUCCEEDED)
        with session_scope() as s:
            s.add(WebhookEndpoint(id="whep_1", project="p", url=receiver.url("/flaky"),
                                  event_types=list(outbox.EVENT_TYPES), secret=SECRET,
                                  created_at=1, updated_at=1))
            outbox.record(s, job_id, "fine_tuning.job.succeeded")
        before = {o: value("lorafleet_webhook_sends_total", outcome=o)
                  for o in ("delivered", "retry", "failed")}

        assert outbox.deliver_due() == 1  # answered 503: sent again after the backoff
        deadline = time.monotonic() + 60
        while not outbox.deliver_due():
            assert time.monotonic() < deadline, "the second send never came due"
            time.sleep(0.02)
    finally:
        receiver.stop()
    assert {o: value("lorafleet_webhook_sends_total", outcome=o) - before[o]
            for o in before} == {"delivered": 1, "retry": 1, "failed": 0}
