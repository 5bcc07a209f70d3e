"""The models a project may call: the ``/v1/models`` listing, and a request's ``model``
resolved to the engine :class:`~shared.inference.Target` that serves it.

A project's models are the base models of its succeeded jobs and those jobs' fine-tuned models
(``ft:<base>:<suffix>:<job id>``); nothing else can be named, so a request never reaches a
model or an adapter of another project.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import ModelNotReady, NotFound
from shared.ids import fine_tuned_model_name
from shared.inference import Target
from shared.lifecycle import JobStatus
from shared.models import Job
from shared.schemas import TrainingSpec

FINE_TUNED_PREFIX = "ft:"


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(default=None,
                                description="The base model of a fine-tuned model.")


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


def list_models(session: Session, project: str) -> ModelsPublic:
    """The base models of the project's succeeded jobs, then their fine-tuned models."""
    rows = list(session.execute(
        select(Job.model, Job.fine_tuned_model, Job.finished_at, Job.created_at)
        .where(Job.project == project, Job.status == JobStatus.SUCCEEDED,
               Job.fine_tuned_model.is_not(None))
        .order_by(Job.seq)
    ))
    bases: dict[str, int] = {}
    for base, _, _, created in rows:
        bases.setdefault(base, created)
    data = [ModelPublic(id=b, created=c, owned_by="lorafleet", parent=None)
            for b, c in bases.items()]
    data += [ModelPublic(id=str(name), created=finished or created, owned_by=f"org-{project}",
                         parent=base) for base, name, finished, created in rows]
    return ModelsPublic(data=data)


def get_model(session: Session, project: str, model: str) -> ModelPublic:
    """One entry of :func:`list_models`; :class:`NotFound` otherwise."""
    for entry in list_models(session, project).data:
        if entry.id == model:
            return entry
    raise _unknown(model)


def _unknown(model: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def resolve_model(session: Session, project: str, model: str) -> Target:
    """The engine target of ``model`` for ``project``.

    ``model`` is a job's ``fine_tuned_model`` (``ft:<base>:<suffix>:<job id>``) or the base
    model of one of the project's succeeded jobs.

    Raises:
        NotFound: no such model in this project.
        ModelNotReady: the name is that of a job of this project that has not succeeded
            (queued, running, failed or cancelled).
    """
    if "\x00" in model:  # no model has one, and PostgreSQL text cannot hold it
        raise _unknown(model)
    if model.startswith(FINE_TUNED_PREFIX):
        job_id = model.rsplit(":", 1)[-1]
        job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
        if job is None:
            raise _unknown(model)
        if job.status != JobStatus.SUCCEEDED:
            if model != fine_tuned_model_name(job.model, job.suffix, job.id):
                raise _unknown(model)
            raise ModelNotReady(
                f"The model '{model}' is not available: its fine-tuning job {job.id} is "
                f"{job.status}" + ("." if job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
                                    else "; it can be used once the job has succeeded."),
                param="model")
        if job.fine_tuned_model != model or not job.adapter_dir:
            raise _unknown(model)
        spec = TrainingSpec.model_validate(job.spec)
        return Target(model=model, base_model=job.model,
                      adapter_path=str(storage.root() / job.adapter_dir),
                      prompt_format=spec.prompt_format)
    used = session.scalar(select(func.count()).select_from(Job).where(
        Job.project == project, Job.status == JobStatus.SUCCEEDED, Job.model == model))
    if not used:
        raise _unknown(model)
    return Target(model=model, base_model=model)
