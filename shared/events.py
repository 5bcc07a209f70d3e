"""A job's event log: what happened to it, as users read it from ``/events``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.ids import now
from shared.models import JobEvent


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    """Append an event to ``job_id``'s log in ``session``'s transaction."""
    # Messages may quote user data (a column name, a file's line); PostgreSQL text cannot
    # hold NUL, and a failed event write must never be what fails a job.
    message = message.replace("\x00", "\\x00")
    session.add(
        JobEvent(job_id=job_id, created_at=now(), level=level, type=type, message=message,
                 data=data)
    )
