"""``validating_files``: check a new job's files against its column map and prompt format.

Job creation answers at once; this check reads the files afterwards, like OpenAI's, and moves
the job to ``queued`` (then wakes a worker) or to ``failed`` with the first bad line named in
``error``. The API runs it in the background of the creating request; a worker's sweeper runs
it for a job whose check never finished (an API that stopped meanwhile). Running it twice is
harmless: the transition out of ``validating_files`` is conditional.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select, update

from shared import lifecycle
from shared.db import session_scope
from shared.dependencies import log_failure
from shared.errors import DependencyUnavailable, LorafleetError
from shared.files import get_file, open_content
from shared.lifecycle import JobStatus
from shared.models import Job
from shared.records import DEFAULT_INSTRUCTION, validate_file
from shared.schemas import TrainingSpec

log = logging.getLogger(__name__)


def check_job_files(job_id: str) -> JobStatus | None:
    """Validate the files of a ``validating_files`` job and move it on.

    Returns the job's new status, or ``None`` when it was not (or no longer) validating.
    Never raises for the user's data: a bad file fails the job, naming the file and line.
    """
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return None
        spec = TrainingSpec.model_validate(job.spec)
        try:
            inputs: list[tuple[str, Path]] = [
                ("training_file", open_content(get_file(s, spec.training_file, job.project)))]
            if spec.validation_file:
                inputs.append(("validation_file", open_content(
                    get_file(s, spec.validation_file, job.project))))
        except DependencyUnavailable:
            raise  # storage is away: the sweeper checks the job again later
        except LorafleetError as e:
            return _fail(job_id, e)
    fmt = spec.prompt_format
    shape: str | None = None
    try:
        for param, path in inputs:
            summary = validate_file(path, column_map=spec.column_map, prompt_format=fmt,
                                    param=param)
            if param == "training_file" and fmt.type != "custom":
                shape = summary.shape
    except LorafleetError as e:
        return _fail(job_id, e)
    if fmt.instruction is None and shape == "dialogsum":
        # Stored with the adapter, so inference wraps a bare dialogue the same way.
        fmt = fmt.model_copy(update={"instruction": DEFAULT_INSTRUCTION})
    spec = spec.model_copy(update={"prompt_format": fmt, "record_shape": shape})
    with session_scope() as s:
        won = lifecycle.files_valid(s, job_id, spec.model_dump(mode="json"))
    return JobStatus.QUEUED if won else None


def _fail(job_id: str, e: LorafleetError) -> JobStatus | None:
    error = {"code": e.code, "message": e.message, "param": e.param}
    with session_scope() as s:
        won = lifecycle.files_invalid(s, job_id, error)
    return JobStatus.FAILED if won else None


# One check at a time per process: a check is CPU-bound Python (JSON parsing), and in the API's
# thread pool several at once would take the interpreter from the requests it must answer.
_ONE_AT_A_TIME = threading.Lock()


def validate_and_send(job_id: str) -> JobStatus | None:
    """:func:`check_job_files`, then wake a worker for a job it queued. Runs after the
    response (a background task), so it never raises: what it could not do, the sweeper
    does."""
    try:
        with _ONE_AT_A_TIME:
            status = check_job_files(job_id)
    except Exception as e:  # noqa: BLE001 - the database is away: the sweeper checks it later
        log_failure(log, f"could not validate the files of {job_id}; the sweeper will", e)
        return None
    if status == JobStatus.QUEUED:
        send_job(job_id)
    return status


def send_job(job_id: str) -> None:
    """Wake a worker for a queued job. If the broker (or the database, to note the send) is
    away, the job stays ``queued`` and the sweeper sends it once both are back; never
    raises."""
    from shared.queue import enqueue_job

    try:
        enqueue_job(job_id)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=time.time()))
    except Exception as e:  # noqa: BLE001 - the sweeper re-sends jobs never enqueued
        log_failure(log, f"could not send {job_id}; the sweeper will", e)
