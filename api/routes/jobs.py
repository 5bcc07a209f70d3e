"""Fine-tuning jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response

from api import jobs
from api.deps import AuthorizationDep, ProjectDep, SessionDep
from api.metadata_filter import MetadataFilter
from api.presenters import checkpoint_public, event_public, job_public
from api.status_cache import job_status, status_cache
from shared.schemas import CheckpointsPublic, EventsPublic, JobCreate, JobPublic, JobsPublic
from shared.validation import send_job, validate_and_send

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, project: ProjectDep,
               background: BackgroundTasks) -> JobPublic:
    """Create a fine-tuning job: stored as ``validating_files``, queued once its files pass."""
    job = jobs.create_job(session, body, project)
    session.commit()  # first: the check after the response reads the committed job
    background.add_task(validate_and_send, job.id)
    return job_public(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    request: Request, session: SessionDep, project: ProjectDep, after: str | None = None,
    limit: Limit = 20,
    metadata: Annotated[str | None, Query(
        description="Filter: metadata[key]=value (each pair must match), or metadata=null "
        "for jobs without metadata.")] = None,
) -> JobsPublic:
    """List jobs, newest first; page with ``after=<last id>``, filter by ``metadata[k]=v``."""
    # metadata[k] names are open-ended: read from the query string, ``metadata`` documents it.
    wanted = MetadataFilter.parse(request.query_params.multi_items())
    rows, more = jobs.list_jobs(session, project, after, limit, wanted)
    return JobsPublic(data=[job_public(j) for j in rows], has_more=more)


# What clients poll: async and served from api.status_cache (the JSON of a JobPublic).
@router.get("/{job_id}", response_model=JobPublic)
async def retrieve_job(job_id: str, authorization: AuthorizationDep) -> Response:
    """A job's status, progress and result."""
    answer = await job_status(job_id, authorization)
    return Response(answer.body, media_type="application/json", headers=answer.headers)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobPublic:
    """Cancel an unfinished job (409 if it already ended)."""
    job = jobs.cancel_job(session, job_id, project)
    session.commit()  # first: the job's next status read must see the cancel
    status_cache.forget(job_id)
    return job_public(job)


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobPublic:
    """Pause a job: a queued job at once, a running one after saving a checkpoint."""
    job = jobs.pause_job(session, job_id, project)
    session.commit()
    status_cache.forget(job_id)
    return job_public(job)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, session: SessionDep, project: ProjectDep,
               background: BackgroundTasks) -> JobPublic:
    """Resume a paused job from its last checkpoint."""
    job = jobs.resume_job(session, job_id, project)
    session.commit()  # first: the worker that the message wakes must find it queued
    status_cache.forget(job_id)
    background.add_task(send_job, job.id)
    return job_public(job)


@router.get("/{job_id}/events", response_model=EventsPublic)
def list_events(job_id: str, session: SessionDep, project: ProjectDep,
                after: str | None = None, limit: Limit = 20) -> EventsPublic:
    """A job's events, newest first."""
    rows, more = jobs.list_events(session, job_id, project, after, limit)
    return EventsPublic(data=[event_public(e) for e in rows], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(job_id: str, session: SessionDep, project: ProjectDep,
                     after: str | None = None, limit: Limit = 10) -> CheckpointsPublic:
    """A job's complete checkpoints, newest first."""
    job = jobs.get_job(session, job_id, project)
    rows, more = jobs.list_checkpoints(session, job_id, project, after, limit)
    data = [checkpoint_public(c, job) for c in rows]
    return CheckpointsPublic(data=data, has_more=more,
                             first_id=data[0].id if data else None,
                             last_id=data[-1].id if data else None)
