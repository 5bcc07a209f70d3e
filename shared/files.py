"""Uploaded data sets: line-by-line validation, storage, lookup."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import Conflict, InvalidDataset, NotFound, PayloadTooLarge
from shared.ids import new_id, now, plausible_id
from shared.models import File, Job
from shared.records import SHAPES, RecordError, check_messages, detect_shape
from shared.schemas import TERMINAL_STATUSES
from shared.settings import get_settings

PURPOSES = ("fine-tune",)
CHUNK = 1 << 20


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a stored (validated) file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, json.loads(raw)


def _check_shape(record: dict[str, Any], shape: str, lineno: int) -> None:
    required, _optional = SHAPES[shape]
    missing = [col for col in required if col not in record]
    if missing:
        raise InvalidDataset(
            f"line {lineno}: missing column '{missing[0]}' (the file's first record is "
            f"{shape}-shaped: {', '.join(required)})",
            param="file",
        )
    for col in required:
        if shape == "chat":
            try:
                check_messages(record[col])
            except RecordError as e:
                raise InvalidDataset(f"line {lineno}: {e}", param="file") from e
        elif not isinstance(record[col], str):
            raise InvalidDataset(
                f"line {lineno}: column '{col}' must be a string, got "
                f"{type(record[col]).__name__}",
                param="file",
            )


def validate_jsonl(path: Path) -> tuple[int, str, list[str]]:
    """Check every line of an upload.

    Returns:
        (record count, detected shape or ``"custom"``, sorted column names seen).

    Raises:
        InvalidDataset: naming the first bad line (not UTF-8, not JSON, not an object, too long,
            missing a column of the file's shape), or an empty file.
    """
    settings = get_settings()
    count, shape, columns = 0, None, set[str]()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if lineno > settings.max_upload_lines:
                raise PayloadTooLarge(
                    f"line {lineno}: more than {settings.max_upload_lines} lines", param="file"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidDataset(f"line {lineno}: not valid UTF-8 ({e.reason})",
                                     param="file") from e
            if len(text) > settings.max_record_chars:
                raise InvalidDataset(
                    f"line {lineno}: record is {len(text)} characters, the limit is "
                    f"{settings.max_record_chars}",
                    param="file",
                )
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise InvalidDataset(f"line {lineno}: invalid JSON ({msg})", param="file") from e
            if not isinstance(record, dict):
                raise InvalidDataset(
                    f"line {lineno}: expected a JSON object, got {type(record).__name__}",
                    param="file",
                )
            if "\\u" in text and not _encodable(record):
                raise InvalidDataset(
                    f"line {lineno}: a \\u escape makes a lone UTF-16 surrogate, which is not "
                    "text (escape characters outside the BMP as a surrogate pair)",
                    param="file",
                )
            if count == 0:
                shape = detect_shape(record) or "custom"
            if shape is not None and shape != "custom":
                _check_shape(record, shape, lineno)
            columns.update(k for k in record if isinstance(k, str))
            count += 1
    if count == 0:
        raise InvalidDataset("line 1: the file is empty (no JSONL records)", param="file")
    return count, shape or "custom", sorted(columns)[:200]


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


def _encodable(record: dict[str, Any]) -> bool:
    """Whether every string in ``record`` is valid Unicode: JSON's ``\\ud800`` escapes decode
    to lone surrogates, which no tokenizer, database or UTF-8 response can take."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_filename(name: str) -> str:
    """Keep the base name only; it is shown back, never used as a path."""
    base = os.path.basename(name.replace("\\", "/")) or "upload.jsonl"
    return "".join(c for c in base if c.isprintable())[:255] or "upload.jsonl"


def get_file(session: Session, file_id: str, project: str = "default") -> File:
    row = (session.scalar(select(File).where(File.id == file_id, File.project == project))
           if plausible_id(file_id) else None)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    return row


def list_files(
    session: Session, project: str = "default", after: str | None = None, limit: int = 100
) -> tuple[list[File], bool]:
    query = select(File).where(File.project == project).order_by(File.seq.desc())
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
            Job.status.not_in(TERMINAL_STATUSES),
        )
    )
    if busy:
        raise Conflict(f"file {file_id} is used by unfinished job {busy}", param="file_id")
    path = storage.root() / row.path
    session.delete(row)
    session.flush()
    path.unlink(missing_ok=True)


def open_content(row: File) -> Path:
    return storage.root() / row.path

