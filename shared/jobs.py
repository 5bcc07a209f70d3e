"""Fine-tuning jobs as the API sees them: create, read, list, cancel, events, checkpoints."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import files, storage
from shared.errors import Conflict, InvalidDataset, InvalidRequest, NotFound, ValidationFailed
from shared.ids import new_id, now
from shared.models import Checkpoint, File, Job, JobEvent
from shared.records import DEFAULT_INSTRUCTION, RecordError, to_example
from shared.schemas import (
    BASE_LEARNING_RATE,
    TERMINAL_STATUSES,
    CheckpointPublic,
    DatasetStats,
    ErrorInfo,
    EventPublic,
    JobCreate,
    JobPublic,
    Progress,
    TrainingSpec,
)
from shared.settings import get_settings
from shared.templates import PromptFormat, template_fields

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
DEFAULT_BATCH_SIZE = 4


# --------------------------------------------------------------------------- events
def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        JobEvent(job_id=job_id, created_at=now(), level=level, type=type, message=message,
                 data=data)
    )


# --------------------------------------------------------------------------- create
def _check_model(model: str) -> str:
    """A hub id, or a local folder (under ``models_dir`` when the operator set one)."""
    settings = get_settings()
    if ".." in Path(model).parts or "\x00" in model:
        raise InvalidRequest("model must not contain '..'", param="model")
    looks_like_path = model.startswith(("/", "./", "~")) or Path(model).is_dir()
    if not looks_like_path:
        if not HUB_ID.match(model):
            raise InvalidRequest(
                f"model '{model}' is neither a model id like 'microsoft/phi-2' nor a folder",
                param="model",
            )
        return model
    path = Path(model).expanduser().resolve()
    if settings.models_dir is not None:
        allowed = settings.models_dir.expanduser().resolve()
        if not path.is_relative_to(allowed):
            raise InvalidRequest(
                "local models must be under the operator's models folder", param="model"
            )
    if not path.is_dir():
        raise InvalidRequest(f"model folder '{model}' does not exist", param="model")
    return str(path)


def _check_limits(req: JobCreate) -> None:
    s = get_settings()
    problems = []
    if req.max_length > s.max_length_limit:
        problems.append(("max_length", f"max_length must be at most {s.max_length_limit}"))
    if req.lora.r > s.max_lora_r:
        problems.append(("lora.r", f"lora.r must be at most {s.max_lora_r}"))
    if req.max_steps is not None and req.max_steps > s.max_steps_limit:
        problems.append(("max_steps", f"max_steps must be at most {s.max_steps_limit}"))
    n_epochs = req.n_epochs or req.openai_hyperparameters().n_epochs
    if isinstance(n_epochs, int | float) and n_epochs > s.max_epochs_limit:
        problems.append(("n_epochs", f"n_epochs must be at most {s.max_epochs_limit}"))
    if problems:
        raise ValidationFailed("; ".join(m for _, m in problems), param=problems[0][0])


def _check_records(
    row: File, spec_fmt: PromptFormat, column_map: dict[str, str] | None, param: str
) -> str | None:
    """Every record must yield an example with this column map; returns the record shape."""
    needed = template_fields(spec_fmt.prompt_template or "") + template_fields(
        spec_fmt.response_template or ""
    )
    shape = None
    for lineno, record in files.iter_records(files.open_content(row)):
        try:
            if spec_fmt.type == "custom":
                mapped = {**record, **{k: record[v] for k, v in (column_map or {}).items()
                                       if v in record}}
                missing = [n for n in needed if n not in mapped]
                if missing:
                    raise RecordError(f"missing column '{missing[0]}' used by the template")
            else:
                example = to_example(record, column_map=column_map)
                shape = shape or example.shape
        except RecordError as e:
            hint = f" (column_map: {column_map})" if column_map else ""
            raise InvalidDataset(f"{param} line {lineno}: {e}{hint}", param=param) from e
    return shape


def build_spec(session: Session, req: JobCreate, project: str) -> TrainingSpec:
    """Validate a request against the operator's limits and the data; the worker's input."""
    _check_limits(req)
    model = _check_model(req.model)
    train = files.get_file(session, req.training_file, project)
    valid = files.get_file(session, req.validation_file, project) if req.validation_file else None
    fmt = PromptFormat.parse(req.prompt_format)
    shape = _check_records(train, fmt, req.column_map, "training_file")
    if valid is not None:
        _check_records(valid, fmt, req.column_map, "validation_file")
    if fmt.instruction is None and shape == "dialogsum":
        # Stored with the adapter, so inference wraps a bare dialogue the same way.
        fmt = fmt.model_copy(update={"instruction": DEFAULT_INSTRUCTION})
    hp = req.openai_hyperparameters()
    batch_size = req.batch_size or (hp.batch_size if isinstance(hp.batch_size, int) else None)
    n_epochs = req.n_epochs or (hp.n_epochs if isinstance(hp.n_epochs, int) else None) or 1
    lr = req.learning_rate
    if lr is None:
        mult = hp.learning_rate_multiplier
        lr = BASE_LEARNING_RATE * (mult if isinstance(mult, int | float) else 1.0)
    return TrainingSpec(
        model=model,
        training_file=train.id,
        validation_file=valid.id if valid else None,
        lora=req.lora,
        prompt_format=fmt,
        record_shape=shape,
        column_map=req.column_map,
        max_length=req.max_length,
        max_steps=req.max_steps,
        n_epochs=float(n_epochs),
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        gradient_accumulation_steps=req.gradient_accumulation_steps,
        learning_rate=lr,
        warmup=req.warmup,
        save_steps=req.save_steps,
        logging_steps=req.logging_steps,
        train_on_inputs=req.train_on_inputs,
        packing=req.packing,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
    )


def fine_tuned_model_name(model: str, suffix: str | None, job_id: str) -> str:
    base = Path(model).name if "/" in model and Path(model).is_absolute() else model
    return f"ft:{base}:{suffix or ''}:{job_id}"


def create_job(session: Session, req: JobCreate, project: str = "default") -> Job:
    """Validate and insert a job as ``queued``; the caller commits, then enqueues it."""
    spec = build_spec(session, req, project)
    job = Job(
        id=new_id("ftjob"),
        project=project,
        created_at=now(),
        model=spec.model,
        suffix=req.suffix,
        status="queued",
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        spec=spec.model_dump(mode="json"),
        seed=spec.seed,
        user_metadata=req.metadata,
        enqueued_at=None,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Validated training file {spec.training_file}")
    add_event(session, job.id, "Fine-tuning job created and queued")
    return job


# --------------------------------------------------------------------------- read
def get_job(session: Session, job_id: str, project: str = "default") -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session,
    project: str = "default",
    after: str | None = None,
    limit: int = 20,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.project == project).order_by(Job.seq.desc())
    if after:
        query = query.where(Job.seq < get_job(session, after, project).seq)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_events(
    session: Session, job_id: str, project: str = "default", after: str | None = None,
    limit: int = 20,
) -> tuple[list[JobEvent], bool]:
    get_job(session, job_id, project)
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
    if after:
        try:
            query = query.where(JobEvent.seq < int(after.removeprefix("ftevent-")))
        except ValueError as e:
            raise InvalidRequest(f"after: '{after}' is not an event id", param="after") from e
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_checkpoints(
    session: Session, job_id: str, project: str = "default", after: str | None = None,
    limit: int = 10,
) -> tuple[list[Checkpoint], bool]:
    """Complete checkpoints still on disk, newest first."""
    get_job(session, job_id, project)
    query = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.deleted.is_(False))
        .order_by(Checkpoint.step_number.desc(), Checkpoint.seq.desc())
    )
    if after:
        ref = session.scalar(select(Checkpoint).where(Checkpoint.id == after))
        if ref is None:
            raise NotFound(f"No such checkpoint: {after}", param="after")
        query = query.where(Checkpoint.step_number < ref.step_number)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# --------------------------------------------------------------------------- cancel
def cancel_job(session: Session, job_id: str, project: str = "default") -> Job:
    """Cancel a job in any unfinished state. A running job stops at its next step."""
    job = get_job(session, job_id, project)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} has already {job.status}", param="fine_tuning_job_id")
    # Not running: nobody holds a lease, so cancel at once (conditional on the state we read).
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "validating_files")),
               Job.attempt == job.attempt)
        .values(status="cancelled", finished_at=now(), cancel_requested=True)
    ).rowcount
    if done:
        add_event(session, job_id, "Job cancelled")
    else:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        add_event(session, job_id, "Cancellation requested; the job stops at its next step")
    session.flush()
    session.refresh(job)
    return job


# --------------------------------------------------------------------------- public shapes
def job_public(job: Job) -> JobPublic:
    spec = TrainingSpec.model_validate(job.spec)
    hp = {
        "n_epochs": spec.n_epochs if spec.max_steps is None else "auto",
        "batch_size": spec.batch_size,
        "learning_rate_multiplier": spec.learning_rate / BASE_LEARNING_RATE,
    }
    return JobPublic(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=f"org-{job.project}",
        status=job.status,  # type: ignore[arg-type]
        training_file=job.training_file,
        validation_file=job.validation_file,
        result_files=[],
        hyperparameters=hp,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        trained_tokens=job.trained_tokens,
        seed=job.seed,
        estimated_finish=job.estimated_finish,
        metadata=job.user_metadata,
        error=ErrorInfo(**job.error) if job.error else None,
        user_provided_suffix=job.suffix,
        lora=spec.lora,
        prompt_format=spec.prompt_format,
        max_length=spec.max_length,
        max_steps=spec.max_steps,
        n_epochs=spec.n_epochs if spec.max_steps is None else None,
        batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        train_on_inputs=spec.train_on_inputs,
        packing=spec.packing,
        progress=Progress(**job.progress) if job.progress else None,
        trainable_parameters=job.trainable_parameters,
        total_parameters=job.total_parameters,
        dataset=DatasetStats(**job.dataset_stats) if job.dataset_stats else None,
        attempt=job.attempt,
        resumed_from_step=job.resumed_from_step,
        last_good_checkpoint_step=job.last_good_step,
        adapter_path=str(storage.root() / job.adapter_dir) if job.adapter_dir else None,
    )


def event_public(event: JobEvent) -> EventPublic:
    return EventPublic(
        id=f"ftevent-{event.seq}",
        created_at=event.created_at,
        level=event.level,  # type: ignore[arg-type]
        message=event.message,
        type=event.type,  # type: ignore[arg-type]
        data=event.data,
    )


def checkpoint_public(ckpt: Checkpoint, job: Job) -> CheckpointPublic:
    name = fine_tuned_model_name(job.model, job.suffix, job.id)
    return CheckpointPublic(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=f"{name}:ckpt-step-{ckpt.step_number}",
        fine_tuning_job_id=job.id,
        step_number=ckpt.step_number,
        metrics=ckpt.metrics,
        path=str(storage.root() / ckpt.path),
    )


def submit_job(session: Session, req: JobCreate, project: str = "default") -> Job:
    """Create a job, commit it, then wake a worker. If the broker is down the job stays
    ``queued`` and the sweeper sends it once the broker is back."""
    import time

    from shared.queue import enqueue_job

    job = create_job(session, req, project)
    session.commit()
    try:
        enqueue_job(job.id)
    except Exception:  # noqa: BLE001 - the sweeper re-sends jobs never enqueued
        import logging

        logging.getLogger(__name__).warning("broker unavailable; %s waits for the sweeper",
                                            job.id, exc_info=True)
        return job
    session.execute(update(Job).where(Job.id == job.id).values(enqueued_at=time.time()))
    session.commit()
    return job
