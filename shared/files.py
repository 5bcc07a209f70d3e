"""Stored files: a project's file row and where its content lies in shared storage. Users
upload data sets (purpose ``fine-tune``); jobs write their results (``fine-tune-results``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import NotFound
from shared.ids import new_id, now, plausible_id
from shared.models import File

RESULTS_PURPOSE = "fine-tune-results"


def get_file(session: Session, file_id: str, project: str = "default") -> File:
    """The project's file ``file_id``.

    Raises:
        NotFound: no such file in this project (another project's id is not found either).
    """
    row = (session.scalar(select(File).where(File.id == file_id, File.project == project))
           if plausible_id(file_id) else None)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    return row


def open_content(row: File) -> Path:
    """Where a file row's content is stored (an upload's JSONL, validated at upload, or a
    job's results)."""
    return storage.root() / row.path


def save_result_file(session: Session, project: str, filename: str, content: bytes,
                     *, columns: list[str] | None = None) -> File:
    """Store a file a job produced (a CSV of its metrics) as a ``fine-tune-results`` file of
    ``project``: listed and downloadable like an upload, never accepted as a job's data."""
    file_id = new_id("file")
    suffix = Path(filename).suffix or ".bin"
    path = storage.root() / "files" / f"{file_id}{suffix}"
    storage.atomic_write_bytes(path, content)
    row = File(id=file_id, project=project, filename=filename, purpose=RESULTS_PURPOSE,
               bytes=len(content), created_at=now(), path=storage.relative(path),
               line_count=max(content.count(b"\n") - 1, 0), record_format=suffix.lstrip("."),
               columns=columns or [], sha256=hashlib.sha256(content).hexdigest())
    session.add(row)
    session.flush()
    return row
