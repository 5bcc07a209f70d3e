"""Uploads: a JSONL file checked line by line, then stored; the project's listing; deletion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import Conflict, InvalidDataset, PayloadTooLarge
from shared.files import get_file
from shared.ids import new_id, now
from shared.lifecycle import TERMINAL
from shared.models import File, Job
from shared.records import validate_file
from shared.settings import get_settings

PURPOSES = ("fine-tune",)
CHUNK = 1 << 20


def validate_jsonl(path: Path) -> tuple[int, str, list[str]]:
    """Check every line of an upload under the operator's limits (``records.validate_file``).

    Returns:
        (record count, detected shape or ``"custom"``, sorted column names seen).

    Raises:
        InvalidDataset: naming the first bad line (not UTF-8, not JSON, not an object, too long,
            missing a column of the file's shape), or an empty file.
        PayloadTooLarge: more lines than ``max_upload_lines``.
    """
    settings = get_settings()
    summary = validate_file(path, max_lines=settings.max_upload_lines,
                            max_record_chars=settings.max_record_chars)
    return summary.count, summary.shape, summary.columns


def save_upload(
    session: Session, stream: BinaryIO, filename: str, purpose: str, project: str = "default"
) -> File:
    """Copy an upload to storage, validate it, and record it. Nothing is kept if it fails."""
    settings = get_settings()
    if purpose not in PURPOSES:
        raise InvalidDataset(
            f"purpose must be one of {', '.join(PURPOSES)}", param="purpose", code="invalid_value"
        )
    file_id = new_id("file")
    final = storage.file_path(file_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{file_id}.upload")
    digest, size = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"file is larger than the limit of {settings.max_upload_bytes} bytes",
                        param="file",
                    )
                digest.update(chunk)
                out.write(chunk)
        count, shape, columns = validate_jsonl(tmp)
        os.replace(tmp, final)
        row = File(
            id=file_id,
            project=project,
            filename=_clean_filename(filename),
            purpose=purpose,
            bytes=size,
            created_at=now(),
            path=storage.relative(final),
            line_count=count,
            record_format=shape,
            columns=columns,
            sha256=digest.hexdigest(),
        )
        session.add(row)
        session.flush()
        return row
    except BaseException:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise


def _clean_filename(name: str) -> str:
    """Keep the base name only; it is shown back, never used as a path."""
    base = os.path.basename(name.replace("\\", "/")) or "upload.jsonl"
    return "".join(c for c in base if c.isprintable())[:255] or "upload.jsonl"


def list_files(
    session: Session, project: str = "default", after: str | None = None, limit: int = 100,
    purpose: str | None = None,
) -> tuple[list[File], bool]:
    """One page of the project's files, newest first, and whether more follow.

    Args:
        after: the id of the last file of the previous page.
        purpose: only files of this purpose (filtered before the page is cut, so that pages
            are full and ``has_more`` is right).

    Raises:
        NotFound: ``after`` is not a file of the project.
    """
    query = select(File).where(File.project == project).order_by(File.seq.desc())
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after:
        query = query.where(File.seq < get_file(session, after, project).seq)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, file_id: str, project: str = "default") -> None:
    """Delete a file unless an unfinished job still needs it (409)."""
    row = get_file(session, file_id, project)
    busy = session.scalar(
        select(Job.id).where(
            (Job.training_file == file_id) | (Job.validation_file == file_id),
            Job.status.not_in(TERMINAL),
        )
    )
    if busy:
        raise Conflict(f"file {file_id} is used by unfinished job {busy}", param="file_id")
    path = storage.root() / row.path
    session.delete(row)
    session.flush()
    path.unlink(missing_ok=True)
