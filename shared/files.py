"""Stored files: a project's file row and its content in storage. Users
upload data sets (purpose ``fine-tune``); jobs write their results (``fine-tune-results``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import InvalidDataset, NotFound
from shared.ids import new_id, now, plausible_id
from shared.models import File
from shared.storage import ObjectMissing
from shared.storage.folders import DamagedFolder

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
    """A local copy of a file row's content (an upload's JSONL, validated at upload, or a
    job's results), fetched to this node's cache; the stored file itself where storage is a
    local folder.

    Raises:
        InvalidDataset: the content is gone from storage, or is not what was stored.
        StorageUnavailable: storage cannot be reached (try again later).
    """
    try:
        return storage.get_cache().file(storage.get_store(), row.path, row.sha256)
    except ObjectMissing:
        raise InvalidDataset(f"the content of file {row.id} is missing from storage",
                             param="file_id") from None
    except DamagedFolder as e:
        raise InvalidDataset(f"the content of file {row.id} is damaged in storage: {e}",
                             param="file_id") from e


def save_result_file(session: Session, project: str, filename: str, content: bytes,
                     *, columns: list[str] | None = None) -> File:
    """Store a file a job produced (a CSV of its metrics) as a ``fine-tune-results`` file of
    ``project``: listed and downloadable like an upload, never accepted as a job's data."""
    file_id = new_id("file")
    suffix = Path(filename).suffix or ".bin"
    key = storage.file_key(file_id, suffix)
    storage.get_store().put_bytes(key, content)
    row = File(id=file_id, project=project, filename=filename, purpose=RESULTS_PURPOSE,
               bytes=len(content), created_at=now(), path=key,
               line_count=max(content.count(b"\n") - 1, 0), record_format=suffix.lstrip("."),
               columns=columns or [], sha256=hashlib.sha256(content).hexdigest())
    session.add(row)
    session.flush()
    return row
