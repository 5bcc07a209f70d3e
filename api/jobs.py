"""Fine-tuning jobs as the API sees them: admission, request → spec, read, list, cancel.

Creating a job does not read its files: the job starts ``validating_files`` and
:mod:`shared.validation` checks the files after the response (in the API's background, or a
worker's sweeper if the API went away), then queues it or fails it naming the bad line.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import continuation
from api.metadata_filter import MetadataFilter
from api.served_models import CHECKPOINT_NAME
from shared import files, lifecycle, methods
from shared.db import QUEUE_LOCK, lock_project
from shared.errors import Conflict, InvalidRequest, NotFound, Overloaded, ValidationFailed
from shared.events import add_event
from shared.ids import new_id, now, plausible_id
from shared.lifecycle import JobStatus
from shared.models import Checkpoint, File, Job, JobEvent
from shared.schemas import DpoSpec, JobCreate, TrainingSpec
from shared.settings import get_settings
from shared.templates import PromptFormat

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
DEFAULT_BATCH_SIZE = 4
# A full queue frees a slot when one of the project's jobs starts: minutes, not seconds.
QUEUE_FULL_RETRY_AFTER_S = 60


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
        Job.project == project, Job.status.in_(lifecycle.WAITING)))
    if waiting is not None and waiting >= limit:
        raise Overloaded(
            f"Too many queued fine-tuning jobs: this project has {waiting} waiting, the limit "
            f"is {limit}. Retry when some have started, or cancel some.",
            retry_after=QUEUE_FULL_RETRY_AFTER_S,
        )


def _input_file(session: Session, file_id: str, project: str, param: str) -> File:
    """A file the job reads; 404 naming the request field when the project has no such file,
    400 when it is not a data set (a job's ``fine-tune-results``, say)."""
    try:
        row = files.get_file(session, file_id, project)
    except NotFound as e:
        raise NotFound(f"{param}: no such file: {file_id}", param=param) from e
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{param}: file {file_id} has purpose '{row.purpose}'; a job "
                             "reads files uploaded with purpose 'fine-tune'", param=param)
    return row


def _check_early_stopping(req: JobCreate) -> None:
    """Early stopping watches the validation loss: it needs a validation file.

    Raises:
        InvalidRequest: naming the option that cannot apply.
    """
    if req.early_stopping_patience is not None and not req.validation_file:
        raise InvalidRequest(
            "early_stopping_patience needs a validation_file: early stopping watches the "
            "validation loss", param="early_stopping_patience")
    if req.early_stopping_threshold is not None and req.early_stopping_patience is None:
        raise InvalidRequest("early_stopping_threshold applies only with "
                             "early_stopping_patience", param="early_stopping_threshold")


def _check_method_fields(req: JobCreate) -> None:
    """Refuse extensions that the job's method does not use, naming the first.

    Raises:
        InvalidRequest: a field of another method, or one this method has no use for.
    """
    method = req.method_type
    facts = methods.METHODS[method]
    for field in facts.unused_fields:
        if field in req.model_fields_set and getattr(req, field):
            raise InvalidRequest(f"{field} does not apply to a {method} job", param=field)
    for other, other_facts in methods.METHODS.items():
        for field in other_facts.own_fields:
            if other != method and getattr(req, field) is not None:
                raise InvalidRequest(f"{field} applies to {other} jobs only (this job's method "
                                     f"is {method})", param=field)


def _method_options(req: JobCreate) -> DpoSpec | None:
    """The settings of the job's method beyond the shared hyperparameters."""
    if req.method_type != "dpo":
        return None
    beta = getattr(req.openai_hyperparameters(), "beta", None)
    return DpoSpec(beta=beta if isinstance(beta, int | float) else methods.DEFAULT_BETA,
                   loss_type=req.loss_type or "sigmoid", rpo_alpha=req.rpo_alpha)


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
    budget = req.max_tokens_per_batch
    if budget is not None and not req.packing:
        problems.append(("max_tokens_per_batch",
                         "max_tokens_per_batch needs packing: true (padded batches have a "
                         "fixed number of examples; use batch_size)"))
    if budget is not None and budget < req.max_length:
        problems.append(("max_tokens_per_batch",
                         f"max_tokens_per_batch ({budget}) must be at least max_length "
                         f"({req.max_length}), so that every example fits in a batch"))
    if problems:
        raise ValidationFailed("; ".join(m for _, m in problems), param=problems[0][0])


def _prompt_format(req: JobCreate, train: File) -> PromptFormat:
    """The request's prompt format. Unset, a chat file or a file of preference pairs (whose
    inputs are chats, tools and several turns included) trains with the base model's chat
    template (OpenAI's users send no format: every assistant message, tool calls included, is
    learned as they expect); other files with ``dolly``."""
    if req.prompt_format is None and train.record_format in ("chat", "preference"):
        return PromptFormat(type="chat")
    return PromptFormat.parse(req.prompt_format)


def build_spec(session: Session, req: JobCreate, project: str) -> TrainingSpec:
    """Check a request against the operator's limits; the worker's input. The files' records
    are checked later (``validating_files``), so this never reads them."""
    _check_limits(req)
    _check_early_stopping(req)
    _check_method_fields(req)
    method = req.method_type
    start = (continuation.continue_from(session, req, project)
             if continuation.is_continuation(req.model) else None)
    model = start.base_model if start else _check_model(req.model)
    train = _input_file(session, req.training_file, project, "training_file")
    methods.check_file(method, train.record_format, train.id, "training_file")
    valid = (_input_file(session, req.validation_file, project, "validation_file")
             if req.validation_file else None)
    if valid is not None:
        methods.check_file(method, valid.record_format, valid.id, "validation_file")
    fmt = start.prompt_format if start else _prompt_format(req, train)
    if fmt.type == "custom" and not methods.METHODS[method].custom_format:
        raise InvalidRequest(f"a {method} job renders its records with the dolly, phi2-qa or "
                             "chat format, not a custom template", param="prompt_format")
    hp = req.openai_hyperparameters()
    batch_size = req.batch_size or (hp.batch_size if isinstance(hp.batch_size, int) else None)
    n_epochs = req.n_epochs or (hp.n_epochs if isinstance(hp.n_epochs, int) else None) or 1
    lr = req.learning_rate
    if lr is None:
        mult = hp.learning_rate_multiplier
        lr = methods.base_learning_rate(method) * (mult if isinstance(mult, int | float) else 1.0)
    # Packed batches are the supervised trainer's; a DPO batch pads its pairs.
    packing = req.packing and "packing" not in methods.METHODS[method].unused_fields
    return TrainingSpec(
        model=model,
        training_file=train.id,
        validation_file=valid.id if valid else None,
        lora=start.lora if start else req.lora,
        prompt_format=fmt,
        record_shape=None,  # set once the files are validated
        column_map=req.column_map,
        max_length=req.max_length,
        max_steps=req.max_steps,
        n_epochs=float(n_epochs),
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        gradient_accumulation_steps=req.gradient_accumulation_steps,
        # Neither a batch size nor a budget: the worker picks (a token budget on a GPU).
        max_tokens_per_batch=req.max_tokens_per_batch or (
            "auto" if batch_size is None and packing else None),
        learning_rate=lr,
        warmup=req.warmup,
        save_steps=req.save_steps,
        logging_steps=req.logging_steps,
        train_on_inputs=req.train_on_inputs,
        packing=packing,
        gradient_checkpointing=req.gradient_checkpointing,
        quantization=req.quantization,
        early_stopping_patience=req.early_stopping_patience,
        early_stopping_threshold=req.early_stopping_threshold or 0.0,
        integrations=req.integrations or [],
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
        initial_model=start.initial_model if start else None,
        initial_adapter=start.initial_adapter if start else None,
        method=method,
        dpo=_method_options(req),
    )


def create_job(session: Session, req: JobCreate, project: str = "default") -> Job:
    """Insert a job as ``validating_files``; the caller commits, then has its files checked.

    Raises:
        Overloaded: the project has ``max_queued_jobs_per_project`` jobs waiting already.
        NotFound, InvalidRequest, ValidationFailed: a bad request field, named.
    """
    _check_queue(session, project)
    spec = build_spec(session, req, project)
    job = Job(
        id=new_id("ftjob"),
        project=project,
        created_at=now(),
        model=spec.model,
        suffix=req.suffix,
        status=JobStatus.VALIDATING_FILES,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        spec=spec.model_dump(mode="json"),
        seed=spec.seed,
        user_metadata=req.metadata,
        enqueued_at=None,
    )
    session.add(job)
    session.flush()
    checking = f"Validating training file: {spec.training_file}"
    if spec.validation_file:
        checking += f" and validation file: {spec.validation_file}"
    add_event(session, job.id, checking)
    if spec.initial_model:
        step = CHECKPOINT_NAME.fullmatch(spec.initial_model)
        add_event(session, job.id, f"Continuing from {spec.initial_model}"
                  + (f" (checkpoint-{step['step']})" if step else ""),
                  data={"initial_model": spec.initial_model})
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
    metadata: MetadataFilter | None = None,
) -> tuple[list[Job], bool]:
    """One page of the project's jobs, newest first, and whether more follow; ``metadata``
    filters before the page is cut."""
    query = select(Job).where(Job.project == project).order_by(Job.seq.desc())
    if metadata is not None:
        query = query.where(*metadata.conditions(session.get_bind().dialect.name))
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
    """Cancel a job in any unfinished state. A running job stops at its next step.

    Raises:
        Conflict: the job has already ended.
    """
    job = get_job(session, job_id, project)
    if job.status in lifecycle.TERMINAL:
        raise Conflict(f"job {job_id} has already {job.status}", param="fine_tuning_job_id")
    lifecycle.cancel(session, job)
    session.flush()
    session.refresh(job)
    return job


# --------------------------------------------------------------------------- pause, resume
PAUSABLE = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)


def pause_job(session: Session, job_id: str, project: str = "default") -> Job:
    """Pause a job: a queued one at once, a running one after its next checkpoint.

    Raises:
        Conflict: the job has ended, is paused already, or has a pause or cancel pending.
    """
    job = get_job(session, job_id, project)
    if job.status not in PAUSABLE:
        raise Conflict(f"job {job_id} is {job.status}; only a validating, queued or running "
                       "job can be paused", param="fine_tuning_job_id")
    if job.cancel_requested or job.pause_requested:
        pending = "cancel" if job.cancel_requested else "pause"
        raise Conflict(f"job {job_id} has a {pending} pending already",
                       param="fine_tuning_job_id")
    lifecycle.pause(session, job)
    session.flush()
    session.refresh(job)
    return job


def resume_job(session: Session, job_id: str, project: str = "default") -> Job:
    """Queue a paused job again; it continues from its last checkpoint.

    Raises:
        Conflict: the job is not paused.
    """
    job = get_job(session, job_id, project)
    if job.status != JobStatus.PAUSED or not lifecycle.resume(session, job):
        raise Conflict(f"job {job_id} is {job.status}; only a paused job can be resumed",
                       param="fine_tuning_job_id")
    session.flush()
    session.refresh(job)
    return job
