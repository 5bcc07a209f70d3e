"""The models a project may call: the ``/v1/models`` listing, and a request's ``model``
resolved to the engine :class:`~shared.inference.Target` that serves it.

A project's models are the base models of its succeeded jobs, those jobs' fine-tuned models
(``ft:<base>:<suffix>:<job id>``) and the checkpoints of its jobs
(``ft:<base>:<suffix>:<job id>:ckpt-step-<N>``, the name ``/checkpoints`` lists); nothing else
can be named, so a request never reaches a model or an adapter of another project.

A fine-tuned model (or a checkpoint's) can be deleted (:func:`delete_model`): its adapter's
files go, its job keeps its history and the name, marked deleted, and the name is no longer
listed or served. The same names resolve to the adapter that a new job continues training from
(:func:`trained_adapter`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import Conflict, InvalidRequest, ModelNotReady, NotFound
from shared.events import add_event
from shared.ids import fine_tuned_model_name, now, plausible_id
from shared.inference import Target
from shared.lifecycle import TERMINAL, JobStatus
from shared.models import Checkpoint, Job, JobEvent
from shared.schemas import TrainingSpec

FINE_TUNED_PREFIX = "ft:"
# A checkpoint's model: its job's fine-tuned model name and the checkpoint's step.
CHECKPOINT_NAME = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>[1-9][0-9]{0,8})")
# What the engine answers for an adapter that does not reproduce its parity probe.
PARITY_FAILED = "adapter_parity_failed"
# PEFT's files of an adapter, which a checkpoint folder holds among the Trainer's state.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(
        default=None, description="The model this one was trained from: the base model, or "
        "the fine-tuned model or checkpoint its job continued from; none for a base model.")
    root: str = Field(description="The base model at the root of this model's lineage.")


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


@dataclass(frozen=True)
class TrainedAdapter:
    """A fine-tuned model's or a checkpoint's adapter, resolved for one project."""

    model: str  # the name it was asked for
    job: Job
    # Its folder's key in storage: PEFT's files (a checkpoint's folder also has the Trainer's
    # state), committed by a manifest.
    folder: str
    step: int | None  # the checkpoint's step; None for the job's final adapter


def list_models(session: Session, project: str) -> ModelsPublic:
    """The base models of the project's succeeded jobs, then their fine-tuned models (except
    deleted ones), then the checkpoints of all its jobs (those retention has not deleted),
    oldest first. A model's ``parent`` is the model its job continued from, else its base."""
    rows = list(session.execute(
        select(Job.model, Job.fine_tuned_model, Job.finished_at, Job.created_at,
               Job.fine_tuned_model_deleted_at, Job.spec)
        .where(Job.project == project, Job.status == JobStatus.SUCCEEDED,
               Job.fine_tuned_model.is_not(None))
        .order_by(Job.seq)
    ))
    bases: dict[str, int] = {}
    for base, _, _, created, _, _ in rows:
        bases.setdefault(base, created)
    owner = f"org-{project}"
    data = [ModelPublic(id=b, created=c, owned_by="lorafleet", parent=None, root=b)
            for b, c in bases.items()]
    data += [ModelPublic(id=str(name), created=finished or created, owned_by=owner,
                         parent=_parent(base, spec), root=base)
             for base, name, finished, created, deleted_at, spec in rows if deleted_at is None]
    checkpoints = session.execute(
        select(Job.model, Job.suffix, Job.id, Job.spec, Checkpoint.step_number,
               Checkpoint.created_at)
        .join(Checkpoint, Checkpoint.job_id == Job.id)
        .where(Job.project == project, Checkpoint.deleted.is_(False))
        .order_by(Job.seq, Checkpoint.step_number)
    )
    data += [ModelPublic(id=checkpoint_model_name(base, suffix, job_id, step), created=created,
                         owned_by=owner, parent=_parent(base, spec), root=base)
             for base, suffix, job_id, spec, step, created in checkpoints]
    return ModelsPublic(data=data)


def _parent(base: str, spec: dict[str, Any]) -> str:
    """The model a job trained from: the fine-tuned model or checkpoint it continued from,
    else its base model."""
    initial = spec.get("initial_model") if isinstance(spec, dict) else None
    return initial if isinstance(initial, str) else base


def checkpoint_model_name(model: str, suffix: str | None, job_id: str, step: int) -> str:
    """The model of a job's checkpoint at ``step``: ``ft:<base>:<suffix>:<job id>:ckpt-step-N``
    (as ``/checkpoints`` names it)."""
    return f"{fine_tuned_model_name(model, suffix, job_id)}:ckpt-step-{step}"


def get_model(session: Session, project: str, model: str) -> ModelPublic:
    """One entry of :func:`list_models`; :class:`NotFound` otherwise."""
    entry = get_model_or_none(session, project, model)
    if entry is None:
        raise _unknown(model)
    return entry


def get_model_or_none(session: Session, project: str, model: str) -> ModelPublic | None:
    """One entry of :func:`list_models`, or None."""
    return next((e for e in list_models(session, project).data if e.id == model), None)


def _unknown(model: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def resolve_model(session: Session, project: str, model: str) -> Target:
    """The engine target of ``model`` for ``project``.

    ``model`` is a job's ``fine_tuned_model`` (``ft:<base>:<suffix>:<job id>``), the model of
    one of a job's checkpoints (that name plus ``:ckpt-step-<N>``), or the base model of one of
    the project's succeeded jobs.

    Raises:
        NotFound: no such model in this project (a checkpoint deleted by retention included).
        ModelNotReady: the name is that of a job of this project that has not succeeded
            (queued, running, failed or cancelled).
    """
    if model.startswith(FINE_TUNED_PREFIX):
        adapter = trained_adapter(session, project, model)
        spec = TrainingSpec.model_validate(adapter.job.spec)
        return Target(model=model, base_model=adapter.job.model,
                      adapter_path=storage.get_store().url(adapter.folder),
                      prompt_format=spec.prompt_format)
    if "\x00" in model:  # no model has one, and PostgreSQL text cannot hold it
        raise _unknown(model)
    used = session.scalar(select(func.count()).select_from(Job).where(
        Job.project == project, Job.status == JobStatus.SUCCEEDED, Job.model == model))
    if not used:
        raise _unknown(model)
    return Target(model=model, base_model=model)


def trained_adapter(session: Session, project: str, model: str) -> TrainedAdapter:
    """The adapter of a fine-tuned model (``ft:<base>:<suffix>:<job id>``) or of one of its
    job's checkpoints (that name plus ``:ckpt-step-<N>``) of ``project``.

    Raises:
        NotFound: no such model in this project: another project's, a base model's name, a
            deleted model, a checkpoint never saved or deleted (by retention or by its owner).
        ModelNotReady: a fine-tuned model whose job has not succeeded.
    """
    if "\x00" in model or not model.startswith(FINE_TUNED_PREFIX):
        raise _unknown(model)
    if (checkpoint := CHECKPOINT_NAME.fullmatch(model)) is not None:
        return _checkpoint_adapter(session, project, model, checkpoint["model"],
                                   int(checkpoint["step"]))
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
    if (job.fine_tuned_model != model or not job.adapter_dir
            or job.fine_tuned_model_deleted_at is not None):
        raise _unknown(model)
    return TrainedAdapter(model=model, job=job, folder=job.adapter_dir, step=None)


def _checkpoint_adapter(session: Session, project: str, model: str, job_model: str,
                        step: int) -> TrainedAdapter:
    """A checkpoint's model: its folder holds the adapter.

    Raises:
        NotFound: the job is not this project's, the name not the job's, or the checkpoint
            is not there: never saved, deleted, or its folder gone.
    """
    job_id = job_model.rsplit(":", 1)[-1]
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
    if job is None or job_model != fine_tuned_model_name(job.model, job.suffix, job.id):
        raise _unknown(model)
    # A later attempt may have saved the same step again: its row is the newest.
    ckpt = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id, Checkpoint.step_number == step,
               Checkpoint.deleted.is_(False))
        .order_by(Checkpoint.seq.desc()).limit(1))
    if ckpt is None:
        raise _unknown(model)
    # Retention removes the folder first, then marks the row: look before sending it on.
    if not has_adapter_files(ckpt.path):
        raise _unknown(model)
    return TrainedAdapter(model=model, job=job, folder=ckpt.path, step=step)


def lock_model(session: Session, project: str, model: str) -> None:
    """Lock the row of the job behind a fine-tuned model's or checkpoint's name, until the
    transaction ends (PostgreSQL; SQLite runs one write at a time). Taken before the name is
    resolved, so that what is read is current: of two deletes, the second finds the model
    gone; a delete and a job that continues from the model happen one after the other."""
    job_id = job_of(model)
    if job_id is not None and plausible_id(job_id):
        session.execute(select(Job.id).where(Job.id == job_id, Job.project == project)
                        .with_for_update())


def has_adapter_files(folder: str) -> bool:
    """Whether the storage folder ``folder`` holds PEFT's files of an adapter.

    Raises:
        StorageUnavailable: storage cannot be reached.
    """
    store = storage.get_store()
    return all(store.exists(storage.join(folder, name)) for name in ADAPTER_FILES)


def delete_model(session: Session, project: str, model: str) -> list[str]:
    """Delete a fine-tuned model or a checkpoint's model of ``project``: from the caller's
    commit on it is neither listed nor served, and a job can no longer continue from it.
    The job keeps its history: it stays ``succeeded`` and its ``fine_tuned_model`` still
    names the model, with ``fine_tuned_model_deleted_at`` set. Deleting a fine-tuned model
    leaves its job's checkpoints as they are (each is deleted by its own name).

    Returns the storage folders of the adapter's files (a checkpoint saved again by a later
    attempt has one per attempt), for the caller to delete once it committed (deleted first,
    a failed commit would leave a listed model without files).

    Raises:
        InvalidRequest: a base model's name; only fine-tuned models can be deleted.
        NotFound: no such model in this project (deleted already included).
        ModelNotReady: a fine-tuned model whose job has not succeeded.
        Conflict: an unfinished job continues from the model, or a checkpoint's job has not
            ended (it may resume from it).
    """
    if not model.startswith(FINE_TUNED_PREFIX):
        if "\x00" not in model and get_model_or_none(session, project, model) is not None:
            raise InvalidRequest(f"'{model}' is a base model; only fine-tuned models "
                                 "(ft:…) can be deleted", param="model")
        raise _unknown(model)
    lock_model(session, project, model)
    adapter = trained_adapter(session, project, model)
    job = adapter.job
    user = _continued_by(session, project, model)
    if user is not None:
        raise Conflict(f"the model '{model}' is used by unfinished job {user}, which continues "
                       "training from it; cancel that job or wait for it to end", param="model")
    if adapter.step is None:
        if job.fine_tuned_model_deleted_at is not None:
            raise _unknown(model)
        job.fine_tuned_model_deleted_at = now()
        job.adapter_dir = None
        add_event(session, job.id, f"Fine-tuned model deleted: {model}")
        folders = [adapter.folder]
    else:
        if job.status not in TERMINAL:
            raise Conflict(f"the checkpoint '{model}' belongs to job {job.id}, which is "
                           f"{job.status} and may resume from it; it can be deleted once the "
                           "job has ended", param="model")
        rows = list(session.scalars(select(Checkpoint).where(
            Checkpoint.job_id == job.id, Checkpoint.step_number == adapter.step,
            Checkpoint.deleted.is_(False))))
        if not rows:
            raise _unknown(model)
        for row in rows:
            row.deleted = True
        add_event(session, job.id, f"Checkpoint model deleted: {model}")
        folders = sorted({row.path for row in rows})
    session.flush()
    return folders


def _continued_by(session: Session, project: str, model: str) -> str | None:
    """An unfinished job of ``project`` that continues training from ``model``, if any (a
    project has few unfinished jobs: the queue limit bounds them)."""
    for job_id, spec in session.execute(
            select(Job.id, Job.spec).where(Job.project == project, Job.status.not_in(TERMINAL))):
        if isinstance(spec, dict) and spec.get("initial_model") == model:
            return job_id
    return None


def job_of(model: str) -> str | None:
    """The job id in a fine-tuned model's or a checkpoint's name; None for a base model."""
    if (checkpoint := CHECKPOINT_NAME.fullmatch(model)) is not None:
        model = checkpoint["model"]
    if not model.startswith(FINE_TUNED_PREFIX):
        return None
    return model.rsplit(":", 1)[-1]


def record_parity_failure(session: Session, model: str, error: dict[str, Any]) -> bool:
    """Note on the model's job that the engine refused the model for parity
    (:data:`PARITY_FAILED`): once per model, however many requests are refused. ``model``
    was resolved for the caller's project. Returns whether an event was added.
    """
    job_id = job_of(model)
    if job_id is None:
        return False
    # Lock the job's row (PostgreSQL; SQLite runs one write at a time): two requests refused
    # at once then add one event between them.
    if session.scalar(select(Job.id).where(Job.id == job_id).with_for_update()) is None:
        return False
    noted = session.scalars(select(JobEvent.data).where(
        JobEvent.job_id == job_id, JobEvent.level == "error"))
    if any(isinstance(d, dict) and d.get("code") == PARITY_FAILED and d.get("model") == model
           for d in noted):
        return False
    message = str(error.get("message") or "the engine refused the model for parity")
    add_event(session, job_id, f"The inference engine refused {model}: {message}",
              level="error", data={"code": PARITY_FAILED, "model": model})
    return True
