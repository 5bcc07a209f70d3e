"""The job state machine, driven in-process on SQLite: every transition, and the policy that
decides what wins when a cancel, the attempt limit and a preemption meet."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from shared import lifecycle
from shared.db import session_scope
from shared.lifecycle import JobStatus, LeaseLost, after_release
from shared.models import Job, JobAttempt, JobEvent

MAX_ATTEMPTS = 3
BACKOFF = 10.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(settings_env: Callable[..., Any]) -> None:
    from shared.migrate import upgrade

    settings_env(max_attempts=MAX_ATTEMPTS, retry_backoff_seconds=BACKOFF)
    upgrade()


def add_job(status: JobStatus, **fields: Any) -> str:
    job_id = f"ftjob-{status}-{time.monotonic_ns()}"
    with session_scope() as s:
        s.add(Job(id=job_id, project="p", created_at=0, model="m", status=status,
                  training_file="file-x", spec={}, seed=0, **fields))
    return job_id


def row(job_id: str) -> Job:
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        s.expunge(job)
        return job


def events(job_id: str) -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)
                              .order_by(JobEvent.seq)))


def running(**fields: Any) -> tuple[str, int]:
    """A job claimed by a worker: its id and the attempt that holds it."""
    job_id = add_job(JobStatus.QUEUED, **fields)
    claim = lifecycle.claim(job_id, "w1")
    assert claim is not None
    return job_id, claim.attempt


# --------------------------------------------------------------------------- the policy table
@pytest.mark.parametrize(("cancel", "failures", "count_failure", "expected"), [
    # rank 1: a requested cancel wins over everything, the attempt limit included
    (True, 0, True, JobStatus.CANCELLED),
    (True, MAX_ATTEMPTS - 1, True, JobStatus.CANCELLED),
    (True, 0, False, JobStatus.CANCELLED),
    # rank 2: failures reaching the limit
    (False, MAX_ATTEMPTS - 1, True, JobStatus.FAILED),
    (False, MAX_ATTEMPTS + 5, True, JobStatus.FAILED),
    # rank 3: a preemption is not a failure, whatever the count so far
    (False, MAX_ATTEMPTS - 1, False, JobStatus.QUEUED),
    (False, MAX_ATTEMPTS, False, JobStatus.QUEUED),
    # rank 4: a failure under the limit retries
    (False, 0, True, JobStatus.QUEUED),
    (False, MAX_ATTEMPTS - 2, True, JobStatus.QUEUED),
])
def test_the_policy_table(cancel: bool, failures: int, count_failure: bool,
                          expected: JobStatus) -> None:
    decision = after_release(cancel_requested=cancel, failures=failures,
                             count_failure=count_failure, max_attempts=MAX_ATTEMPTS,
                             backoff_seconds=BACKOFF)

    assert decision.status == expected
    assert decision.failures == failures + (1 if count_failure else 0)


def test_backoff_doubles_per_failure_and_preemption_waits_none() -> None:
    def delay(failures: int, count: bool) -> float:
        return after_release(cancel_requested=False, failures=failures, count_failure=count,
                             max_attempts=10, backoff_seconds=BACKOFF).backoff_seconds

    assert [delay(n, True) for n in range(4)] == [BACKOFF, 2 * BACKOFF, 4 * BACKOFF, 8 * BACKOFF]
    assert delay(3, False) == 0


# --------------------------------------------------------------------------- validating_files
def test_files_valid_queues_and_stores_the_completed_spec(db: None) -> None:
    job_id = add_job(JobStatus.VALIDATING_FILES)

    with session_scope() as s:
        assert lifecycle.files_valid(s, job_id, {"record_shape": "dialogsum"})
    with session_scope() as s:  # a second checker finds nothing to do
        assert not lifecycle.files_valid(s, job_id, {"record_shape": "other"})

    job = row(job_id)
    assert job.status == JobStatus.QUEUED and job.spec == {"record_shape": "dialogsum"}


def test_files_invalid_fails_the_job_with_the_error(db: None) -> None:
    job_id = add_job(JobStatus.VALIDATING_FILES)
    error = {"code": "invalid_file", "message": "training_file line 3: missing", "param": "t"}

    with session_scope() as s:
        assert lifecycle.files_invalid(s, job_id, error)

    job = row(job_id)
    assert job.status == JobStatus.FAILED and job.error == error
    assert job.finished_at is not None
    assert "Job failed: training_file line 3: missing" in events(job_id)


def test_a_check_never_revives_a_cancelled_job(db: None) -> None:
    job_id = add_job(JobStatus.VALIDATING_FILES)
    with session_scope() as s:
        assert lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))
    with session_scope() as s:
        assert not lifecycle.files_valid(s, job_id, {})

    assert row(job_id).status == JobStatus.CANCELLED


# --------------------------------------------------------------------------- claim
def test_claim_moves_a_queued_job_to_running_once(db: None) -> None:
    job_id = add_job(JobStatus.QUEUED)

    first = lifecycle.claim(job_id, "w1")
    second = lifecycle.claim(job_id, "w2")

    assert first is not None and first.attempt == 1 and second is None
    job = row(job_id)
    assert (job.status, job.attempt, job.lease_owner) == (JobStatus.RUNNING, 1, "w1")


@pytest.mark.parametrize("status", [JobStatus.VALIDATING_FILES, *lifecycle.TERMINAL])
def test_only_a_queued_job_can_be_claimed(db: None, status: JobStatus) -> None:
    job_id = add_job(status)

    assert lifecycle.claim(job_id, "w1") is None
    assert row(job_id).status == status


def test_a_job_in_its_backoff_or_with_a_cancel_requested_is_not_claimed(db: None) -> None:
    later = add_job(JobStatus.QUEUED, not_before=time.time() + 3600)
    cancelled = add_job(JobStatus.QUEUED, cancel_requested=True)

    assert lifecycle.claim(later, "w1") is None
    assert lifecycle.claim(cancelled, "w1") is None


# --------------------------------------------------------------------------- progress
def test_progress_is_fenced_on_the_attempt(db: None) -> None:
    job_id, attempt = running()

    lifecycle.progress(job_id, attempt, trained_tokens=10, event="step 1")
    with pytest.raises(LeaseLost):
        lifecycle.progress(job_id, attempt + 1, trained_tokens=20)

    assert row(job_id).trained_tokens == 10
    assert "step 1" in events(job_id)


def test_progress_never_writes_a_status(db: None) -> None:
    job_id, attempt = running()

    with pytest.raises(ValueError, match="status"):
        lifecycle.progress(job_id, attempt, status=JobStatus.SUCCEEDED)
    assert row(job_id).status == JobStatus.RUNNING


# --------------------------------------------------------------------------- finish
def test_finish_ends_the_job_once(db: None) -> None:
    job_id, attempt = running()

    assert lifecycle.finish(job_id, attempt, JobStatus.SUCCEEDED, message="done",
                            fine_tuned_model="ft:m::x")
    assert not lifecycle.finish(job_id, attempt, JobStatus.FAILED, message="late")

    job = row(job_id)
    assert (job.status, job.fine_tuned_model, job.lease_owner) == (
        JobStatus.SUCCEEDED, "ft:m::x", None)
    with session_scope() as s:
        outcome = s.scalar(select(JobAttempt.outcome).where(JobAttempt.job_id == job_id))
    assert outcome == JobStatus.SUCCEEDED


def test_finish_refuses_a_status_that_is_not_final(db: None) -> None:
    job_id, attempt = running()

    with pytest.raises(ValueError, match="final"):
        lifecycle.finish(job_id, attempt, JobStatus.QUEUED, message="?")
    assert row(job_id).status == JobStatus.RUNNING


def test_a_stale_attempt_cannot_finish(db: None) -> None:
    job_id, attempt = running()
    assert lifecycle.release(job_id, attempt, reason="crash", count_failure=True)
    with session_scope() as s:  # due at once, so another worker claims it
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    newer = lifecycle.claim(job_id, "w2")
    assert newer is not None

    assert not lifecycle.finish(job_id, attempt, JobStatus.SUCCEEDED, message="stale")
    assert row(job_id).status == JobStatus.RUNNING and row(job_id).attempt == newer.attempt


# --------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("status", lifecycle.WAITING)
def test_cancel_of_a_waiting_job_is_immediate(db: None, status: JobStatus) -> None:
    job_id = add_job(status)

    with session_scope() as s:
        done = lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))

    assert done and row(job_id).status == JobStatus.CANCELLED
    assert row(job_id).finished_at is not None


def test_cancel_of_a_running_job_is_a_request_its_worker_sees(db: None) -> None:
    job_id, attempt = running()

    with session_scope() as s:
        done = lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))

    assert not done
    assert row(job_id).status == JobStatus.RUNNING and row(job_id).cancel_requested
    assert lifecycle.heartbeat(job_id, attempt).cancel_requested


# --------------------------------------------------------------------------- release
def test_a_failure_requeues_after_a_backoff(db: None) -> None:
    job_id, attempt = running()
    before = time.time()

    assert lifecycle.release(job_id, attempt, reason="OOM", count_failure=True, step=3) == (
        JobStatus.QUEUED)

    job = row(job_id)
    assert (job.status, job.failures, job.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert job.not_before is not None and job.not_before >= before + BACKOFF
    assert "OOM at step 3; job queued" in events(job_id)


def test_a_preemption_requeues_now_without_counting_a_failure(db: None) -> None:
    job_id, attempt = running(failures=MAX_ATTEMPTS - 1)

    assert lifecycle.preempt(job_id, attempt, reason="node going away", step=5) == (
        JobStatus.QUEUED)

    job = row(job_id)
    assert (job.status, job.failures, job.not_before) == (JobStatus.QUEUED, MAX_ATTEMPTS - 1,
                                                           None)


def test_the_last_allowed_failure_fails_the_job(db: None) -> None:
    job_id, attempt = running(failures=MAX_ATTEMPTS - 1)

    assert lifecycle.release(job_id, attempt, reason="OOM", count_failure=True) == (
        JobStatus.FAILED)

    job = row(job_id)
    assert job.status == JobStatus.FAILED and job.error is not None
    assert job.error["code"] == "max_attempts"
    assert f"gave up after {MAX_ATTEMPTS} failed attempts" in job.error["message"]


def test_a_requested_cancel_beats_the_attempt_limit_for_a_worker(db: None) -> None:
    job_id, attempt = running(failures=MAX_ATTEMPTS - 1)
    with session_scope() as s:
        lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))

    assert lifecycle.release(job_id, attempt, reason="OOM", count_failure=True) == (
        JobStatus.CANCELLED)
    assert row(job_id).error is None


def test_a_requested_cancel_beats_the_attempt_limit_for_the_sweeper(db: None) -> None:
    job_id, _ = running(failures=MAX_ATTEMPTS - 1)
    with session_scope() as s:
        lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))

    assert lifecycle.release_stale(row(job_id), "Worker w1 lost", 4) == JobStatus.CANCELLED
    assert row(job_id).error is None


def test_a_requested_cancel_beats_a_preemption(db: None) -> None:
    job_id, attempt = running()
    with session_scope() as s:
        lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))

    assert lifecycle.preempt(job_id, attempt, reason="node going away", step=2) == (
        JobStatus.CANCELLED)


def test_the_sweeper_gives_up_after_the_attempt_limit(db: None) -> None:
    job_id, _ = running(failures=MAX_ATTEMPTS - 1)

    assert lifecycle.release_stale(row(job_id), "Worker w1 lost; will restart", 7) == (
        JobStatus.FAILED)

    job = row(job_id)
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert f"gave up after {MAX_ATTEMPTS} attempts (last step 7)" in job.error["message"]


def test_the_sweeper_requeues_a_lost_attempt_with_a_backoff(db: None) -> None:
    job_id, _ = running()

    assert lifecycle.release_stale(row(job_id), "Worker w1 lost; will restart", None) == (
        JobStatus.QUEUED)
    job = row(job_id)
    assert (job.failures, job.enqueued_at) == (1, None)
    assert job.not_before is not None and job.not_before > time.time()


def test_the_sweeper_loses_to_a_heartbeat_it_did_not_see(db: None) -> None:
    job_id, attempt = running()
    seen = row(job_id)
    time.sleep(0.01)  # the heartbeat below writes a later time than the one read
    assert lifecycle.heartbeat(job_id, attempt).alive

    assert lifecycle.release_stale(seen, "Worker w1 lost", None) is None
    assert row(job_id).status == JobStatus.RUNNING


def test_a_release_by_a_stale_attempt_changes_nothing(db: None) -> None:
    job_id, attempt = running()

    assert lifecycle.release(job_id, attempt + 1, reason="?", count_failure=True) is None
    assert row(job_id).status == JobStatus.RUNNING and row(job_id).failures == 0


# --------------------------------------------------------------------------- one module
def _updates_jobs(call: ast.Call) -> bool:
    """Whether a ``….values(…)`` call ends a chain that starts with ``update(Job)``."""
    node: ast.AST = call.func
    while isinstance(node, ast.Attribute | ast.Call):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "update"):
            return any(isinstance(a, ast.Name) and a.id == "Job" for a in node.args)
        node = node.value if isinstance(node, ast.Attribute) else node.func
    return False


def test_only_the_lifecycle_module_writes_a_status() -> None:
    """No ``update(Job)….values(status=…)`` outside shared/lifecycle.py (the insert of a new
    job names its first status, which is not a transition)."""
    offenders = []
    for package in ("api", "worker", "shared", "cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "shared" / "lifecycle.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "values" and _updates_jobs(node)
                        and any(k.arg in ("status", None) for k in node.keywords)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_status_check_finds_a_write_outside_the_module() -> None:
    """The check above is not vacuous: it flags the shape of a status write."""
    tree = ast.parse("session.execute(update(Job).where(Job.id == x).values(status='queued'))")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "values"]
    assert calls and _updates_jobs(calls[0])
