"""Job leases: claim with a fencing token, heartbeat, fenced writes, sweep of lost jobs.

The job row is the truth. A worker *claims* a job by moving it from ``queued`` to ``running`` and
bumping ``attempt``; ``attempt`` is then its fencing token. Every later write is
``UPDATE … WHERE id = :id AND attempt = :attempt AND status = 'running'``: a worker whose write
matches no row has lost the job (the sweeper re-queued it, or it was cancelled) and must stop.
Duplicate broker deliveries are harmless because only one claim can win.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import aliased

from shared.db import execute_count, session_scope
from shared.ids import now
from shared.jobs import RUNNING_LOCK, add_event, lock_project
from shared.models import Checkpoint, Job, JobAttempt
from shared.queue import enqueue_job
from shared.settings import get_settings

log = logging.getLogger(__name__)


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


class LeaseLost(Exception):
    """This worker's write matched no row: another attempt owns the job now."""


def _fenced(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
    return update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def claim(job_id: str, worker: str) -> Claim | None:
    """Take ``job_id`` if it is queued and due. ``None``: someone else has it, or it is done.

    On PostgreSQL the row is locked with ``FOR UPDATE SKIP LOCKED`` so competing workers do not
    wait for each other; SQLite serialises writers, and the conditional update decides there.

    A job whose project already runs ``max_running_jobs_per_project`` jobs is left queued
    (``None``); the sweeper sends it again after ``requeue_after_seconds``.
    """
    t = time.time()
    limit = get_settings().max_running_jobs_per_project
    with session_scope() as s:
        job = s.scalar(
            select(Job)
            .where(Job.id == job_id, Job.status == "queued")
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
                       .where(other.project == job.project, other.status == "running"))
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
            .where(Job.id == job_id, Job.status == "queued", Job.attempt == job.attempt,
                   *under_limit)
            .values(status="running", attempt=new_attempt, lease_owner=worker, heartbeat_at=t,
                    not_before=None)
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
        return Claim(job_id, new_attempt, worker, dict(job.spec), job.model,
                     job.last_good_checkpoint, job.last_good_step, job.failures, job.project,
                     job.suffix)


@dataclass(frozen=True)
class Beat:
    alive: bool
    cancel_requested: bool


def heartbeat(job_id: str, attempt: int) -> Beat:
    t = time.time()
    with session_scope() as s:
        alive = execute_count(s, _fenced(job_id, attempt).values(heartbeat_at=t)) == 1
        s.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
            .values(last_seen_at=t)
        )
        cancel = bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    return Beat(alive, cancel)


def fenced_update(job_id: str, attempt: int, *, event: str | None = None,
                  event_type: str = "message", event_data: dict[str, Any] | None = None,
                  level: str = "info", **values: Any) -> None:
    """Write job fields (and optionally an event) only while this attempt owns the job.

    Raises:
        LeaseLost: the job was re-queued, cancelled or claimed by another attempt.
    """
    values = values or {"heartbeat_at": time.time()}  # an event alone still checks the fence
    with session_scope() as s:
        if execute_count(s, _fenced(job_id, attempt).values(**values)) != 1:
            raise LeaseLost(f"{job_id} attempt {attempt} no longer holds the lease")
        if event:
            add_event(s, job_id, event, level=level, type=event_type, data=event_data)


def record_checkpoint(job_id: str, attempt: int, step: int, rel_path: str,
                      metrics: dict[str, Any]) -> str:
    """Record a *complete* checkpoint as the job's resume point; returns its id."""
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
    return ckpt_id


def mark_checkpoints_deleted(job_id: str, steps: list[int]) -> None:
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


def finish(job_id: str, attempt: int, status: str, *, message: str,
           error: dict[str, Any] | None = None, level: str = "info", **values: Any) -> bool:
    """Move a running job to a final state; ``False`` if this attempt no longer owns it."""
    try:
        fenced_update(job_id, attempt, status=status, finished_at=now(), error=error,
                      lease_owner=None, event=message, level=level, **values)
    except LeaseLost:
        return False
    end_attempt(job_id, attempt, status)
    return True


def release(job_id: str, attempt: int, *, reason: str, count_failure: bool,
            step: int | None = None) -> bool:
    """Give a running job back to the queue (preemption, transient error) and wake a worker.

    A preempted job keeps its failure count; a transient failure adds one and waits a backoff.
    When the failures reach ``max_attempts`` the job fails instead.
    """
    settings = get_settings()
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.attempt != attempt or job.status != "running":
            return False
        failures = job.failures + (1 if count_failure else 0)
        values: dict[str, Any]
        if count_failure and failures >= settings.max_attempts:
            status, values = "failed", {
                "finished_at": now(),
                "error": {"code": "max_attempts", "param": None,
                          "message": f"{reason} (gave up after {failures} failed attempts)"},
            }
        elif job.cancel_requested:
            status, values = "cancelled", {"finished_at": now()}
        else:
            delay = settings.retry_backoff_seconds * (2 ** (failures - 1)) if count_failure else 0
            status, values = "queued", {"not_before": time.time() + delay if delay else None,
                                        "enqueued_at": time.time()}
        won = execute_count(s, _fenced(job_id, attempt).values(
            status=status, failures=failures, lease_owner=None, heartbeat_at=None, **values
        ))
        if not won:
            return False
        where = f" at step {step}" if step is not None else ""
        add_event(s, job_id, f"{reason}{where}; job {status}",
                  level="warn" if status != "failed" else "error",
                  data={"attempt": attempt, "step": step, "failures": failures})
    end_attempt(job_id, attempt, "released" if status == "queued" else status)
    if status == "queued":
        not_before = values.get("not_before")
        try:
            enqueue_job(job_id, countdown=not_before - time.time() if not_before else None)
        except Exception:  # broker down: the job is queued in the database, the sweeper sends it
            log.warning("could not enqueue %s; the sweeper will", job_id, exc_info=True)
    return True


def sweep() -> list[str]:
    """Re-queue jobs whose lease expired, and re-send queued jobs nobody picked up.

    Runs periodically in every worker (and in ``lorafleet up``); safe to run concurrently:
    every transition is conditional on the attempt and heartbeat it read.
    """
    settings = get_settings()
    t = time.time()
    requeued: list[str] = []
    with session_scope() as s:
        stale = list(s.scalars(select(Job).where(
            Job.status == "running", Job.heartbeat_at < t - settings.lease_seconds)))
    for job in stale:
        step = job.progress.get("step") if job.progress else None
        resume = (f"; will resume from checkpoint-{job.last_good_step}"
                  if job.last_good_step else "; will restart from the beginning")
        reason = f"Worker {job.lease_owner} lost (no heartbeat for {settings.lease_seconds:.0f}s)"
        _release_stale(job, reason + resume, step)  # the loop below sends it when due
    with session_scope() as s:
        waiting = list(s.scalars(select(Job).where(
            Job.status == "queued", Job.cancel_requested.is_(False),
            (Job.enqueued_at.is_(None)) | (Job.enqueued_at < t - settings.requeue_after_seconds),
        )))
        for job in waiting:
            if job.not_before and job.not_before > t:
                continue
            same_send = (Job.enqueued_at.is_(None) if job.enqueued_at is None
                         else Job.enqueued_at == job.enqueued_at)
            won = execute_count(s, update(Job)
                                .where(Job.id == job.id, Job.status == "queued", same_send)
                                .values(enqueued_at=t))
            if won:
                requeued.append(job.id)
    for job_id in requeued:
        try:
            enqueue_job(job_id)
        except Exception:  # broker down: the next sweep tries again
            log.warning("could not enqueue %s", job_id, exc_info=True)
    return requeued


def _release_stale(job: Job, reason: str, step: int | None) -> bool:
    """Like :func:`release` for an attempt whose worker is gone, fenced on its heartbeat."""
    settings = get_settings()
    with session_scope() as s:
        failures = job.failures + 1
        values: dict[str, Any]
        if job.cancel_requested:
            status, values, level = "cancelled", {"finished_at": now()}, "info"
        elif failures >= settings.max_attempts:
            status, level = "failed", "error"
            values = {"finished_at": now(), "error": {
                "code": "worker_lost", "param": None,
                "message": f"{reason.split(';')[0]}; gave up after {failures} attempts "
                           f"(last step {step})"}}
        else:
            status, level = "queued", "warn"
            delay = settings.retry_backoff_seconds * (2 ** (failures - 1))
            values = {"not_before": time.time() + delay, "enqueued_at": None}
        won = execute_count(s, update(Job).where(
            Job.id == job.id, Job.attempt == job.attempt, Job.status == "running",
            Job.heartbeat_at == job.heartbeat_at,
        ).values(status=status, failures=failures, lease_owner=None, heartbeat_at=None,
                 **values))
        if not won:
            return False
        at = f" at step {step}" if step is not None else ""
        add_event(s, job.id, reason.replace(" lost", f" lost{at}", 1) + f"; job {status}",
                  level=level, data={"attempt": job.attempt, "step": step, "failures": failures})
    end_attempt(job.id, job.attempt, "lost")
    return True
