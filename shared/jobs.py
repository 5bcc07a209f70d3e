"""Fine-tuning jobs as the API sees them: create, read, list, cancel, events, checkpoints."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared import files, storage
from shared.db import execute_count
from shared.errors import (
    Conflict,
    InvalidDataset,
    InvalidRequest,
    NotFound,
    Overloaded,
    ValidationFailed,
)
from shared.ids import new_id, now, plausible_id
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
WAITING_STATUSES = ("validating_files", "queued")
# A full queue frees a slot when one of the project's jobs starts: minutes, not seconds.
QUEUE_FULL_RETRY_AFTER_S = 60
# Keys of PostgreSQL advisory locks (first half of the pair; the second is the project).
QUEUE_LOCK, RUNNING_LOCK = 1, 2


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
    # Messages may quote user data (a column name, a file's line); PostgreSQL text cannot
    # hold NUL, and a failed event write must never be what fails a job.
    message = message.replace("\x00", "\\x00")
    session.add(
        JobEvent(job_id=job_id, created_at=now(), level=level, type=type, message=message,
                 data=data)
    )


def lock_project(session: Session, project: str, purpose: int) -> None:
    """Serialise one kind of per-project admission decision (``QUEUE_LOCK``, ``RUNNING_LOCK``)
    until the transaction ends. PostgreSQL only: SQLite runs one writer at a time already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(purpose, func.hashtext(project))))


# --------------------------------------------------------------------------- create
def _check_model(model: str) -> str:
    """A hub id (``org/name``), or an absolute path under the operator's ``models_dir``.

    Users never name other server paths: no relative or ``~`` paths, no ``..``, no symlink
    out of the models folder, and no local path at all while ``models_dir`` is unset.

    Raises:
        InvalidRequest: any other ``model``.
    """
    if not model.isprintable():  # NUL, control and bidi characters, lone surrogates
        raise InvalidRequest("model contains control or invisible characters", param="model")
    if not model.startswith("/"):
        # transformers prefers a local folder of the same name over the hub: a hub id that
        # names a folder here (relative to the server's working directory) is refused.
        if HUB_ID.match(model) and ".." not in model and not Path(model).exists():
            return model
        raise InvalidRequest(
            f"model '{model}' is not a model id like 'microsoft/phi-2' (local models are "
            "named by an absolute path under the operator's models folder)",
            param="model",
        )
    models_dir = get_settings().models_dir
    if models_dir is None:
        raise InvalidRequest(
            "local model paths are not accepted by this server (its operator has set no "
            "models folder, LORAFLEET_MODELS_DIR); name a hub model id",
            param="model",
        )
    path = Path(model).resolve()  # follows symlinks, so a link out of the folder is refused
    if not path.is_relative_to(models_dir.resolve()):
        raise InvalidRequest("local models must be under the operator's models folder",
                             param="model")
    if not path.is_dir():
        raise InvalidRequest(f"model folder '{model}' does not exist", param="model")
    return str(path)


def _check_queue(session: Session, project: str) -> None:
    """Refuse a job while the project has ``max_queued_jobs_per_project`` waiting (429)."""
    limit = get_settings().max_queued_jobs_per_project
    lock_project(session, project, QUEUE_LOCK)
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.project == project, Job.status.in_(WAITING_STATUSES)))
    if waiting is not None and waiting >= limit:
        raise Overloaded(
            f"Too many queued fine-tuning jobs: this project has {waiting} waiting, the limit "
            f"is {limit}. Retry when some have started, or cancel some.",
            retry_after=QUEUE_FULL_RETRY_AFTER_S,
        )


def _input_file(session: Session, file_id: str, project: str, param: str) -> File:
    """A file the job reads; 404 naming the request field when the project has no such file."""
    try:
        return files.get_file(session, file_id, project)
    except NotFound as e:
        raise NotFound(f"{param}: no such file: {file_id}", param=param) from e


def _check_limits(req: JobCreate) -> None:
    s = get_settings()
    problems = []
    if req.max_length > s.max_length_limit:
        problems.append(("max_length", f"max_length must be at most {s.max_length_limit}"))
    if req.lora.r > s.max_lora_r:
        problems.append(("lora.r", f"lora.r must be at most {s.max_lora_r}"))
    for name in ("max_steps", "save_steps", "logging_steps"):
        value = getattr(req, name)
        if value is not None and value > s.max_steps_limit:
            problems.append((name, f"{name} must be at most {s.max_steps_limit}"))
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
    train = _input_file(session, req.training_file, project, "training_file")
    valid = (_input_file(session, req.validation_file, project, "validation_file")
             if req.validation_file else None)
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
        gradient_checkpointing=req.gradient_checkpointing,
        quantization=req.quantization,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
    )


def fine_tuned_model_name(model: str, suffix: str | None, job_id: str) -> str:
    base = Path(model).name if "/" in model and Path(model).is_absolute() else model
    return f"ft:{base}:{suffix or ''}:{job_id}"


def create_job(session: Session, req: JobCreate, project: str = "default") -> Job:
    """Validate and insert a job as ``queued``; the caller commits, then enqueues it.

    Raises:
        Overloaded: the project has ``max_queued_jobs_per_project`` jobs waiting already.
    """
    _check_queue(session, project)
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
    job = (session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
           if plausible_id(job_id) else None)
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
            seq = int(after.removeprefix("ftevent-"))
        except ValueError as e:
            raise InvalidRequest(f"after: '{after}' is not an event id", param="after") from e
        # Only an event of this job is a cursor: another job's ids do not exist here.
        if not 0 < seq < 2**63 or session.scalar(select(JobEvent.seq).where(
                JobEvent.seq == seq, JobEvent.job_id == job_id)) is None:
            raise NotFound(f"No such event: {after}", param="after")
        query = query.where(JobEvent.seq < seq)
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
        ref = (session.scalar(select(Checkpoint).where(Checkpoint.id == after,
                                                       Checkpoint.job_id == job_id))
               if plausible_id(after) else None)
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
    done = execute_count(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "validating_files")),
               Job.attempt == job.attempt)
        .values(status="cancelled", finished_at=now(), cancel_requested=True),
    )
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
        gradient_checkpointing=spec.gradient_checkpointing,
        quantization=spec.quantization,
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
