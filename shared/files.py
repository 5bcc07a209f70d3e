"""Stored data sets: a project's file row and where its content lies in shared storage."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import NotFound
from shared.ids import plausible_id
from shared.models import File


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
    """The stored JSONL of a file row (validated at upload)."""
    return storage.root() / row.path
