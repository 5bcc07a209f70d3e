"""The life of a fine-tuning job: its statuses, its transitions, and who wins when they meet.

Every write of ``Job.status`` in the code base goes through a function of this module. The job
row is the truth; Celery only carries wake-up calls.

States and transitions::

    validating_files ──files_valid──▶ queued ──claim──▶ running ──finish──▶ succeeded
        │      │                       ▲ │ ▲              │ │ │             | failed
        │      └─files_invalid─▶ failed│ │ └──release─────┘ │ │             | cancelled
        │                              │ │  (policy table)  │ │
        │   pause (at once)            │ ▼ pause            │ └─ paused() (a requested pause,
        └──(files_valid, if asked)─▶ paused ◀───────────────┘    after a checkpoint)
                                       │ resume → queued; cancel → cancelled

A worker *claims* a queued job by moving it to ``running`` and bumping ``attempt``; ``attempt``
is then its fencing token. Every later write of that worker is
``UPDATE … WHERE id = :id AND attempt = :attempt AND status = 'running'``: a write that matches
no row means the attempt lost the job (the sweeper re-queued it, or it ended) and must stop.
Duplicate broker deliveries are harmless because only one claim can win.

**Ending an attempt without finishing** (a worker gives the job back, or the sweeper finds its
heartbeat expired) is decided by :func:`after_release`, one policy for both, in this order:

====  ===========================  =====================================  ===============
rank  when                         why                                    the job becomes
====  ===========================  =====================================  ===============
1     a cancel was requested       the user's explicit word ends the job  ``cancelled``
2     a pause was requested        the user asked it to stop for now      ``paused``
3     failures reach max_attempts  retrying again would not help          ``failed``
4     preempted (no failure)       the node went away, not the job        ``queued`` now
5     otherwise (a failure)        transient: OOM, I/O, a lost worker     ``queued`` after
                                                                          a backoff
====  ===========================  =====================================  ===============

A preemption never counts as a failure, so rank 3 applies only to failures; a failure still
counts under ranks 1 and 2. A cancel of a job nobody trains (``validating_files``, ``queued``,
``paused``) takes effect at once; of a running job it is a request the worker honours at its
next step (or rank 1 above, if it dies first). A pause of a queued job is immediate; of a
``validating_files`` job it applies once the files pass; of a running job it is a request: the
worker saves a checkpoint and the job becomes ``paused`` (:func:`paused`). ``resume`` queues a
paused job again, and it continues from that checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Update, func, select, update
from sqlalchemy.orm import Session, aliased

from shared import metrics as prometheus
from shared import outbox
from shared.db import RUNNING_LOCK, execute_count, lock_project, session_scope
from shared.dependencies import log_failure
from shared.events import add_event
from shared.ids import now
from shared.models import Checkpoint, Job, JobAttempt
from shared.settings import get_settings

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    """A job's status, with OpenAI's names."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Statuses a job never leaves.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: Statuses of a job that waits for a worker (they count against the queue limit).
WAITING = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED)
#: Statuses a cancel ends at once: nobody trains the job.
IDLE = (*WAITING, JobStatus.PAUSED)


class LeaseLost(Exception):
    """This worker's write matched no row: another attempt owns the job now, or it ended."""


#: The webhook event each status a transition reaches sends (OpenAI's names, plus ``paused``).
WEBHOOK_EVENTS = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
    JobStatus.PAUSED: "fine_tuning.job.paused",
}


def _reached(session: Session, job_id: str, status: JobStatus) -> None:
    """What every transition does on reaching ``status``, in its own transaction: record the
    webhook event, so that an event is sent if and only if the change is committed; and
    observe the duration of a job that ended (:mod:`shared.metrics`)."""
    event = WEBHOOK_EVENTS.get(status)
    if event is not None:
        outbox.record(session, job_id, event)
    if status in TERMINAL:
        created = session.scalar(select(Job.created_at).where(Job.id == job_id))
        if created is not None:
            prometheus.job_finished(status, time.time() - created)


# --------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class Release:
    """What becomes of a job whose running attempt ended without finishing."""

    status: JobStatus
    failures: int
    backoff_seconds: float  # before the job may be claimed again (``queued`` only)
    reason: str  # which row of the policy table applied


def after_release(*, cancel_requested: bool, failures: int, count_failure: bool,
                  max_attempts: int, backoff_seconds: float,
                  pause_requested: bool = False) -> Release:
    """The policy table of this module's docstring, as a pure function.

    Args:
        cancel_requested: the user asked to cancel the job.
        pause_requested: the user asked to pause the job.
        failures: failed attempts so far, not counting this one.
        count_failure: this attempt ended badly (``False`` for a preemption).
        max_attempts: the operator's limit on failed attempts.
        backoff_seconds: the first retry's delay; each further failure doubles it.
    """
    total = failures + (1 if count_failure else 0)
    if cancel_requested:
        return Release(JobStatus.CANCELLED, total, 0.0, "cancel requested")
    if pause_requested:
        return Release(JobStatus.PAUSED, total, 0.0, "pause requested")
    if count_failure and total >= max_attempts:
        return Release(JobStatus.FAILED, total, 0.0, "max attempts")
    if not count_failure:
        return Release(JobStatus.QUEUED, total, 0.0, "preempted")
    return Release(JobStatus.QUEUED, total, backoff_seconds * 2 ** (total - 1), "retry")


# --------------------------------------------------------------------------- validation
def files_valid(session: Session, job_id: str, spec: dict[str, Any]) -> bool:
    """``validating_files`` → ``queued``, with the spec completed by the check; ``False`` if the
    job left ``validating_files`` meanwhile (cancelled, or another checker was first)."""
    paused = execute_count(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.VALIDATING_FILES, Job.pause_requested,
    ).values(status=JobStatus.PAUSED, spec=spec, pause_requested=False))
    if paused:
        add_event(session, job_id, "Files validated; job paused as requested")
        _reached(session, job_id, JobStatus.PAUSED)
        return True
    won = execute_count(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.VALIDATING_FILES,
    ).values(status=JobStatus.QUEUED, spec=spec, enqueued_at=None))
    if won:
        add_event(session, job_id, "Files validated, moving job to queued state")
    return bool(won)


def files_invalid(session: Session, job_id: str, error: dict[str, Any]) -> bool:
    """``validating_files`` → ``failed`` with ``error`` naming the file and line."""
    won = execute_count(session, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.VALIDATING_FILES,
    ).values(status=JobStatus.FAILED, finished_at=now(), error=error))
    if won:
        add_event(session, job_id, f"Job failed: {error['message']}", level="error")
        _reached(session, job_id, JobStatus.FAILED)
    return bool(won)


# --------------------------------------------------------------------------- cancel
def cancel(session: Session, job: Job) -> bool:
    """Cancel ``job`` (read in ``session``). A job nobody trains is cancelled at once
    (``True``); a running one gets a request that its worker honours at its next step
    (``False``)."""
    done = execute_count(session, update(Job).where(
        Job.id == job.id, Job.status.in_(IDLE), Job.attempt == job.attempt,
    ).values(status=JobStatus.CANCELLED, finished_at=now(), cancel_requested=True))
    if done:
        add_event(session, job.id, "Job cancelled")
        _reached(session, job.id, JobStatus.CANCELLED)
    else:
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
        add_event(session, job.id, "Cancellation requested; the job stops at its next step")
    return bool(done)


# --------------------------------------------------------------------------- pause, resume
def pause(session: Session, job: Job) -> bool:
    """Pause ``job`` (read in ``session``): a queued job at once (``True``); a running or
    validating one gets a request (``False``): its worker saves a checkpoint first, or its
    file check ends in ``paused``. The caller has checked the status is one of those."""
    done = execute_count(session, update(Job).where(
        Job.id == job.id, Job.status == JobStatus.QUEUED, Job.attempt == job.attempt,
    ).values(status=JobStatus.PAUSED, enqueued_at=None))
    if done:
        add_event(session, job.id, "Job paused")
        _reached(session, job.id, JobStatus.PAUSED)
    else:
        session.execute(update(Job).where(Job.id == job.id).values(pause_requested=True))
        add_event(session, job.id, "Pause requested; the job saves a checkpoint and pauses")
    return bool(done)


def resume(session: Session, job: Job) -> bool:
    """``paused`` → ``queued``; ``False`` if the job was not paused (any more). The caller
    commits, then sends the job to the broker (or leaves it to the sweeper)."""
    done = execute_count(session, update(Job).where(
        Job.id == job.id, Job.status == JobStatus.PAUSED,
    ).values(status=JobStatus.QUEUED, pause_requested=False, not_before=None,
             enqueued_at=None))
    if done:
        step = f" from checkpoint-{job.last_good_step}" if job.last_good_step else ""
        add_event(session, job.id, f"Job resumed; it continues{step}")
    return bool(done)


# --------------------------------------------------------------------------- claim
@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    worker: str
    spec: dict[str, Any]
    model: str
    last_good_checkpoint: str | None
    last_good_step: int | None
    failures: int
    project: str
    suffix: str | None


def _fenced(job_id: str, attempt: int) -> Update:
    return update(Job).where(Job.id == job_id, Job.attempt == attempt,
                             Job.status == JobStatus.RUNNING)


def claim(job_id: str, worker: str) -> Claim | None:
    """``queued`` → ``running`` if the job is due. ``None``: someone else has it, it is done,
    or its project runs ``max_running_jobs_per_project`` jobs already (the sweeper sends it
    again after ``requeue_after_seconds``).

    On PostgreSQL the row is locked with ``FOR UPDATE SKIP LOCKED`` so competing workers do not
    wait for each other; SQLite serialises writers, and the conditional update decides there.
    """
    t = time.time()
    limit = get_settings().max_running_jobs_per_project
    with session_scope() as s:
        job = s.scalar(
            select(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .with_for_update(skip_locked=True)
        )
        if job is None or job.cancel_requested:
            return None
        if job.not_before is not None and job.not_before > t:
            return None
        under_limit = []
        if limit is not None:
            lock_project(s, job.project, RUNNING_LOCK)
            other = aliased(Job)
            running = (select(func.count()).select_from(other)
                       .where(other.project == job.project, other.status == JobStatus.RUNNING))
            if (s.scalar(running) or 0) >= limit:
                log.info("job %s stays queued: project %s runs %d jobs already", job_id,
                         job.project, limit)
                return None
            # Counted again inside the update: on SQLite the update is the atomic step.
            under_limit.append(running.scalar_subquery() < limit)
        new_attempt = job.attempt + 1
        won = execute_count(
            s,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempt == job.attempt,
                   *under_limit)
            .values(status=JobStatus.RUNNING, attempt=new_attempt, lease_owner=worker,
                    heartbeat_at=t, not_before=None)
        )
        if not won:
            return None
        start_step = job.last_good_step or 0
        s.add(JobAttempt(job_id=job_id, attempt=new_attempt, worker=worker, started_at=t,
                         last_seen_at=t, start_step=start_step))
        msg = f"Attempt {new_attempt} started on {worker}"
        if job.last_good_checkpoint:
            msg += f", resuming from checkpoint-{job.last_good_step}"
        add_event(s, job_id, msg, data={"attempt": new_attempt, "worker": worker})
        prometheus.attempt_started()
        return Claim(job_id, new_attempt, worker, dict(job.spec), job.model,
                     job.last_good_checkpoint, job.last_good_step, job.failures, job.project,
                     job.suffix)


# --------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class Beat:
    alive: bool
    cancel_requested: bool
    pause_requested: bool = False


def heartbeat(job_id: str, attempt: int) -> Beat:
    """Renew the lease of ``attempt``; whether it still holds it, and whether to cancel."""
    t = time.time()
    with session_scope() as s:
        alive = execute_count(s, _fenced(job_id, attempt).values(heartbeat_at=t)) == 1
        s.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
            .values(last_seen_at=t)
        )
        flags = s.execute(select(Job.cancel_requested, Job.pause_requested)
                          .where(Job.id == job_id)).one_or_none()
    cancel, pause_ = (bool(flags[0]), bool(flags[1])) if flags else (False, False)
    return Beat(alive, cancel, pause_)


def progress(job_id: str, attempt: int, *, event: str | None = None,
             event_type: str = "message", event_data: dict[str, Any] | None = None,
             level: str = "info", **values: Any) -> None:
    """Write job fields (and optionally an event) only while this attempt owns the job.

    ``values`` never include ``status``: a status changes through a transition of this module.

    Raises:
        LeaseLost: the job was re-queued, cancelled or claimed by another attempt.
    """
    if "status" in values:
        raise ValueError("progress() does not change a job's status; use a transition")
    _fenced_write(job_id, attempt, event=event, event_type=event_type, event_data=event_data,
                  level=level, **values)


def _fenced_write(job_id: str, attempt: int, *, event: str | None, event_type: str = "message",
                  event_data: dict[str, Any] | None = None, level: str = "info",
                  **values: Any) -> None:
    values = values or {"heartbeat_at": time.time()}  # an event alone still checks the fence
    with session_scope() as s:
        if execute_count(s, _fenced(job_id, attempt).values(**values)) != 1:
            raise LeaseLost(f"{job_id} attempt {attempt} no longer holds the lease")
        if event:
            add_event(s, job_id, event, level=level, type=event_type, data=event_data)
        if "status" in values:
            _reached(s, job_id, values["status"])


def record_checkpoint(job_id: str, attempt: int, step: int, rel_path: str,
                      metrics: dict[str, Any]) -> str:
    """Record a *complete* checkpoint as the job's resume point; returns its id.

    Raises:
        LeaseLost: this attempt no longer owns the job.
    """
    ckpt_id = f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}"
    with session_scope() as s:
        won = execute_count(
            s,
            _fenced(job_id, attempt).values(last_good_checkpoint=rel_path, last_good_step=step)
        )
        if won != 1:
            raise LeaseLost(f"{job_id} attempt {attempt} no longer holds the lease")
        # A step saved again by a later attempt replaces the earlier row.
        old = s.scalar(select(Checkpoint).where(Checkpoint.id == ckpt_id))
        if old is not None:
            s.delete(old)
            s.flush()
        s.add(Checkpoint(id=ckpt_id, job_id=job_id, created_at=now(), step_number=step,
                         path=rel_path, metrics=metrics, attempt=attempt))
        add_event(s, job_id, f"Checkpoint saved at step {step}", type="metrics",
                  data={"step": step, **metrics})
        outbox.record(s, job_id, "fine_tuning.job.checkpoint.created",
                      {"checkpoint_id": ckpt_id, "step_number": step})
    return ckpt_id


def mark_checkpoints_deleted(job_id: str, steps: list[int]) -> None:
    """Checkpoints removed from disk by retention are no longer listed."""
    if not steps:
        return
    with session_scope() as s:
        s.execute(update(Checkpoint)
                  .where(Checkpoint.job_id == job_id, Checkpoint.step_number.in_(steps))
                  .values(deleted=True))


def end_attempt(job_id: str, attempt: int, outcome: str) -> None:
    """Close an attempt's fencing record. The first close wins: a worker that comes back after
    the sweeper declared it lost must not move the end of its attempt past the next claim."""
    with session_scope() as s:
        s.execute(update(JobAttempt)
                  .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                         JobAttempt.ended_at.is_(None))
                  .values(ended_at=time.time(), outcome=outcome))


# --------------------------------------------------------------------------- finish
def finish(job_id: str, attempt: int, status: JobStatus, *, message: str,
           error: dict[str, Any] | None = None, level: str = "info", **values: Any) -> bool:
    """``running`` → a final ``status``; ``False`` if this attempt no longer owns the job."""
    if status not in TERMINAL:
        raise ValueError(f"finish() ends a job; {status!r} is not a final status")
    try:
        _fenced_write(job_id, attempt, status=status, finished_at=now(), error=error,
                      lease_owner=None, event=message, level=level, **values)
    except LeaseLost:
        return False
    end_attempt(job_id, attempt, status)
    return True


def paused(job_id: str, attempt: int, *, step: int | None) -> JobStatus | None:
    """A worker that honoured a pause request (its checkpoint is saved) gives the job back:
    :func:`release` without counting a failure; the policy table makes it ``paused`` (or
    ``cancelled``, if a cancel came too)."""
    return release(job_id, attempt, reason="Paused as requested; checkpoint saved",
                   count_failure=False, step=step)


# --------------------------------------------------------------------------- release
def _release_values(decision: Release, *, code: str, message: str) -> dict[str, Any]:
    """The job fields that :func:`after_release`'s decision writes."""
    if decision.status == JobStatus.CANCELLED:
        return {"finished_at": now()}
    if decision.status == JobStatus.PAUSED:
        return {"pause_requested": False}
    if decision.status == JobStatus.FAILED:
        return {"finished_at": now(), "error": {"code": code, "param": None, "message": message}}
    delay = decision.backoff_seconds
    return {"not_before": time.time() + delay if delay else None}


def release(job_id: str, attempt: int, *, reason: str, count_failure: bool,
            step: int | None = None) -> JobStatus | None:
    """A worker gives its running job back: after a preemption (``count_failure=False``), an
    error it may not see again, or a lease it could no longer renew. The policy table decides
    what the job becomes; a re-queued job is sent to the broker at once (or after its backoff).

    Returns the new status, or ``None`` if this attempt no longer owned the job.
    """
    settings = get_settings()
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.attempt != attempt or job.status != JobStatus.RUNNING:
            return None
        decision = after_release(cancel_requested=job.cancel_requested, failures=job.failures,
                                 count_failure=count_failure,
                                 pause_requested=job.pause_requested,
                                 max_attempts=settings.max_attempts,
                                 backoff_seconds=settings.retry_backoff_seconds)
        values = _release_values(
            decision, code="max_attempts",
            message=f"{reason} (gave up after {decision.failures} failed attempts)")
        if decision.status == JobStatus.QUEUED:
            values["enqueued_at"] = time.time()
        won = execute_count(s, _fenced(job_id, attempt).values(
            status=decision.status, failures=decision.failures, lease_owner=None,
            heartbeat_at=None, **values))
        if not won:
            return None
        where = f" at step {step}" if step is not None else ""
        _reached(s, job_id, decision.status)
        if decision.status == JobStatus.QUEUED:
            prometheus.requeued("preempted" if decision.reason == "preempted" else "failure")
        add_event(s, job_id, f"{reason}{where}; job {decision.status}",
                  level={JobStatus.FAILED: "error", JobStatus.PAUSED: "info"}.get(
                      decision.status, "warn"),
                  data={"attempt": attempt, "step": step, "failures": decision.failures})
    end_attempt(job_id, attempt,
                "released" if decision.status == JobStatus.QUEUED else decision.status)
    if decision.status == JobStatus.QUEUED:
        _send(job_id, values.get("not_before"))
    return decision.status


def preempt(job_id: str, attempt: int, *, reason: str, step: int | None) -> JobStatus | None:
    """A worker that is shutting down gives its running job back after saving a checkpoint:
    :func:`release` without counting a failure (rank 3 of the policy table, unless rank 1)."""
    status = release(job_id, attempt, reason=reason, count_failure=False, step=step)
    if status is not None:
        prometheus.preempted()
    return status


def release_stale(job: Job, reason: str, step: int | None) -> JobStatus | None:
    """The sweeper's :func:`release` for an attempt whose worker is gone, fenced on the
    heartbeat it read (a worker that renewed meanwhile keeps its job). The job is not sent to
    the broker here: the sweeper sends it once its backoff has passed.

    On PostgreSQL a job row that another transaction holds is left for a later sweep rather
    than waited for: a worker frozen in the middle of a write (a paused VM, SIGSTOP) holds its
    lock until it runs again or dies, and the sweep must go on with the other jobs meanwhile.
    """
    settings = get_settings()
    with session_scope() as s:
        free = s.scalar(select(Job.id).where(Job.id == job.id)
                        .with_for_update(skip_locked=True))
        if free is None:
            log.warning("job %s is not re-queued yet: another transaction holds its row (its "
                        "worker %s frozen in the middle of a write?); the next sweep tries "
                        "again", job.id, job.lease_owner)
            return None
        decision = after_release(cancel_requested=job.cancel_requested, failures=job.failures,
                                 count_failure=True, pause_requested=job.pause_requested,
                                 max_attempts=settings.max_attempts,
                                 backoff_seconds=settings.retry_backoff_seconds)
        values = _release_values(
            decision, code="worker_lost",
            message=f"{reason.split(';')[0]}; gave up after {decision.failures} attempts "
                    f"(last step {step})")
        if decision.status == JobStatus.QUEUED:
            values["enqueued_at"] = None
        won = execute_count(s, update(Job).where(
            Job.id == job.id, Job.attempt == job.attempt, Job.status == JobStatus.RUNNING,
            Job.heartbeat_at == job.heartbeat_at,
        ).values(status=decision.status, failures=decision.failures, lease_owner=None,
                 heartbeat_at=None, **values))
        if not won:
            return None
        at = f" at step {step}" if step is not None else ""
        level = {JobStatus.CANCELLED: "info", JobStatus.FAILED: "error"}.get(decision.status,
                                                                             "warn")
        _reached(s, job.id, decision.status)
        prometheus.lease_lost()
        if decision.status == JobStatus.QUEUED:
            prometheus.requeued("lease_lost")
        add_event(s, job.id, reason.replace(" lost", f" lost{at}", 1) + f"; job {decision.status}",
                  level=level,
                  data={"attempt": job.attempt, "step": step, "failures": decision.failures})
    end_attempt(job.id, job.attempt, "lost")
    return decision.status


def _send(job_id: str, not_before: float | None) -> None:
    from shared.queue import enqueue_job

    try:
        enqueue_job(job_id, countdown=not_before - time.time() if not_before else None)
    except Exception as e:  # broker down: the job is queued in the database, the sweeper sends it
        log_failure(log, f"could not enqueue {job_id}; the sweeper will", e)
