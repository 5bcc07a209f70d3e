"""The sweeper: re-queue jobs whose worker vanished, finish lost file checks, re-send jobs.

Runs periodically in every worker (and as ``lorafleet sweep``); safe to run concurrently: every
transition it makes is conditional on the attempt and heartbeat it read (see
:mod:`shared.lifecycle`).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select, update

from shared import lifecycle
from shared.db import execute_count, session_scope
from shared.dependencies import log_failure
from shared.lifecycle import JobStatus
from shared.models import Job
from shared.queue import enqueue_job
from shared.settings import get_settings
from shared.validation import check_job_files

log = logging.getLogger(__name__)


def sweep() -> list[str]:
    """One pass; returns the ids of the jobs it sent to the broker. A job it could not send
    (the broker is away) is sent by the next pass that finds the broker back."""
    settings = get_settings()
    t = time.time()
    with session_scope() as s:
        stale = list(s.scalars(select(Job).where(
            Job.status == JobStatus.RUNNING, Job.heartbeat_at < t - settings.lease_seconds)))
        # A file check the API did not finish (it stopped, or its database was away).
        unchecked = list(s.scalars(select(Job.id).where(
            Job.status == JobStatus.VALIDATING_FILES,
            Job.created_at < t - settings.requeue_after_seconds)))
    for job in stale:
        step = job.progress.get("step") if job.progress else None
        resume = (f"; will resume from checkpoint-{job.last_good_step}"
                  if job.last_good_step else "; will restart from the beginning")
        reason = f"Worker {job.lease_owner} lost (no heartbeat for {settings.lease_seconds:.0f}s)"
        lifecycle.release_stale(job, reason + resume, step)  # the loop below sends it when due
    for job_id in unchecked:
        try:
            check_job_files(job_id)  # a queued job is sent by the loop below
        except Exception as e:  # noqa: BLE001 - storage away: the next pass checks it again
            log_failure(log, f"could not check the files of {job_id}", e)
    requeued: list[str] = []
    with session_scope() as s:
        waiting = list(s.scalars(select(Job).where(
            Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False),
            (Job.enqueued_at.is_(None)) | (Job.enqueued_at < t - settings.requeue_after_seconds),
        )))
        for job in waiting:
            if job.not_before and job.not_before > t:
                continue
            same_send = (Job.enqueued_at.is_(None) if job.enqueued_at is None
                         else Job.enqueued_at == job.enqueued_at)
            won = execute_count(s, update(Job)
                                .where(Job.id == job.id, Job.status == JobStatus.QUEUED,
                                       same_send)
                                .values(enqueued_at=t))
            if won:
                requeued.append(job.id)
    sent: list[str] = []
    for job_id in requeued:
        try:
            enqueue_job(job_id)
            sent.append(job_id)
        except Exception as e:  # broker down: the next sweep tries again
            log_failure(log, f"could not enqueue {job_id}", e)
            _unsent(job_id, t)
    return sent


def _unsent(job_id: str, t: float) -> None:
    """Mark a job this pass marked as sent at ``t`` as never sent, so that the next pass
    sends it rather than wait ``requeue_after_seconds``."""
    try:
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.enqueued_at == t)
                      .values(enqueued_at=None))
    except Exception as e:  # noqa: BLE001 - then it waits requeue_after_seconds, as before
        log_failure(log, f"could not mark {job_id} unsent", e)
