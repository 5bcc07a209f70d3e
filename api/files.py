"""Uploads: a JSONL file checked line by line as it is streamed to storage; the project's
listing; deletion."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import deletions, storage
from shared.deletions import Deletion
from shared.errors import Conflict, InvalidDataset, NotFound, PayloadTooLarge
from shared.files import get_file
from shared.ids import new_id, now
from shared.lifecycle import TERMINAL
from shared.models import File, Job
from shared.records import FileSummary, validate_file
from shared.settings import get_settings
from shared.storage import ObjectMissing, StoreWriter

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


def check_purpose(purpose: str) -> None:
    """Raises :class:`InvalidDataset` (naming ``purpose``) for a purpose uploads cannot have."""
    if purpose not in PURPOSES:
        raise InvalidDataset(
            f"purpose must be one of {', '.join(PURPOSES)}", param="purpose", code="invalid_value"
        )


@dataclass
class StagedUpload:
    """An upload whose bytes are all in storage, checked, and not yet visible there: its
    write is committed by :func:`commit_upload`, or aborted."""

    file_id: str
    key: str
    writer: StoreWriter
    size: int
    sha256: str
    summary: FileSummary

    def abort(self) -> None:
        self.writer.abort()


def stage_upload(chunks: Iterable[bytes | bytearray]) -> StagedUpload:
    """Send an upload's chunks to storage as they come (in parts: never the whole file in
    memory), hashing, counting and validating every line on the way.

    Raises:
        InvalidDataset: a bad line (named) or an empty file; nothing is kept.
        PayloadTooLarge: over ``max_upload_bytes`` or ``max_upload_lines``; nothing is kept.
        StorageUnavailable: storage cannot be reached; nothing is kept.
    """
    settings = get_settings()
    file_id = new_id("file")
    key = storage.file_key(file_id)
    digest, size = hashlib.sha256(), 0

    def counted(writer: StoreWriter) -> Iterator[bytes | bytearray]:
        nonlocal size
        for chunk in chunks:
            size += len(chunk)
            if size > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"file is larger than the limit of {settings.max_upload_bytes} bytes",
                    param="file",
                )
            digest.update(chunk)
            writer.write(chunk)
            yield chunk

    writer = storage.get_store().writer(key)
    with writer:  # an error aborts the write: nothing is kept
        lines = split_lines(counted(writer), settings.max_record_chars)
        summary = validate_file(lines, max_lines=settings.max_upload_lines,
                                max_record_chars=settings.max_record_chars)
    return StagedUpload(file_id, key, writer, size, digest.hexdigest(), summary)


def split_lines(chunks: Iterable[bytes | bytearray], max_record_chars: int
                ) -> Iterator[bytes]:
    """The lines of a stream of chunks, each with its ``\\n`` (as a file's lines are). A line
    that is already too long for any record is passed on cut at the limit rather than held
    whole: its check refuses it."""
    limit = 4 * max_record_chars + 4  # UTF-8 takes at most 4 bytes a character
    pending = b""
    for chunk in chunks:
        # BytesIO splits at "\n" only (as a file does), in C.
        for line in io.BytesIO(pending + chunk if pending else chunk):
            if line.endswith(b"\n"):
                yield line
                pending = b""
            else:
                pending = line
        if len(pending) > limit:
            cut = limit
            while cut > 0 and pending[cut] & 0xC0 == 0x80:  # not inside a character
                cut -= 1
            yield pending[:cut]
            pending = b""
    if pending:
        yield pending


def commit_upload(session: Session, staged: StagedUpload, filename: str, purpose: str,
                  project: str = "default") -> File:
    """Make a staged upload visible in storage and record it; on any error nothing is kept.

    Raises:
        InvalidDataset: an unknown ``purpose``.
    """
    try:
        check_purpose(purpose)
        staged.writer.commit()
    except BaseException:
        staged.abort()
        raise
    try:
        row = File(
            id=staged.file_id,
            project=project,
            filename=_clean_filename(filename),
            purpose=purpose,
            bytes=staged.size,
            created_at=now(),
            path=staged.key,
            line_count=staged.summary.count,
            record_format=staged.summary.shape,
            columns=staged.summary.columns,
            sha256=staged.sha256,
        )
        session.add(row)
        session.flush()
        return row
    except BaseException:
        storage.get_store().delete([staged.key])
        raise


def save_upload(
    session: Session, stream: BinaryIO, filename: str, purpose: str, project: str = "default"
) -> File:
    """Validate an upload read from ``stream``, store it and record it. Nothing is kept if it
    fails."""
    check_purpose(purpose)
    staged = stage_upload(iter(lambda: stream.read(CHUNK), b""))
    return commit_upload(session, staged, filename, purpose, project)


def content_chunks(row: File) -> Iterator[bytes]:
    """A file's content, read from storage chunk by chunk (opened now: a store that cannot be
    reached answers before the response starts).

    Raises:
        NotFound: the content is gone from storage.
        StorageUnavailable: storage cannot be reached.
    """
    try:
        return storage.get_store().read_chunks(row.path, CHUNK)
    except ObjectMissing:
        raise NotFound(f"the content of file {row.id} is missing from storage",
                       param="file_id") from None


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


def delete_file(session: Session, file_id: str, project: str = "default") -> list[Deletion]:
    """Delete a file unless an unfinished job still needs it (409). Its content (and, with the
    last file of that content, the data sets tokenized from it) is scheduled for deletion in
    the caller's transaction: returns what to purge once it commits."""
    row = get_file(session, file_id, project)
    busy = session.scalar(
        select(Job.id).where(
            (Job.training_file == file_id) | (Job.validation_file == file_id),
            Job.status.not_in(TERMINAL),
        )
    )
    if busy:
        raise Conflict(f"file {file_id} is used by unfinished job {busy}", param="file_id")
    session.delete(row)
    session.flush()
    last = session.scalar(select(File.id).where(File.sha256 == row.sha256).limit(1)) is None
    # With the last file of this content, the data sets tokenized from it go too.
    return deletions.schedule(
        session, objects=[row.path],
        folders=[storage.dataset_cache_prefix(row.sha256)] if last else [])
