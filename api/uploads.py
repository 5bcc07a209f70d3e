"""``POST /v1/files`` streamed: the multipart body is parsed as it arrives and the file's bytes
go on to storage at once (:func:`api.files.stage_upload`, in a thread of its own), so an upload
is hashed, checked and sent in parts while the client is still sending it, and is never held
whole in memory or spooled to a temporary file first.

The event loop reads and parses the body; the thread hashes, validates and uploads. They meet
at a bounded queue, so a slow store slows the client down (TCP back-pressure) rather than
filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api import files
from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.models import File

FILE_FIELD, PURPOSE_FIELD = "file", "purpose"
DEFAULT_PURPOSE = "fine-tune"
BATCH = 1 << 20  # file bytes handed to the storage thread at a time
QUEUE_BATCHES = 4  # batches waiting for it at most
MAX_FIELD_BYTES = 1024  # a form field other than the file (purpose)

# The request body, as the OpenAPI schema shows it (the route reads the stream itself).
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "title": "Body_upload_file_v1_files_post",
        "type": "object",
        "required": [FILE_FIELD],
        "properties": {
            FILE_FIELD: {"type": "string", "contentMediaType": "application/octet-stream",
                         "title": "File"},
            PURPOSE_FIELD: {"type": "string", "title": "Purpose", "default": DEFAULT_PURPOSE},
        },
    }}},
}


class _Feed:
    """The file's bytes on their way from the event loop to the storage thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | bytearray | None] = queue.Queue(QUEUE_BATCHES)
        self.batch = bytearray()
        self.job: Future[files.StagedUpload] | None = None

    def chunks(self) -> Iterator[bytes | bytearray]:
        while (chunk := self.queue.get()) is not None:
            yield chunk

    async def put(self, item: bytes | bytearray | None) -> None:
        """Hand ``item`` to the thread, waiting (off the event loop) while the queue is full;
        dropped once the thread has stopped (it refused the file: the rest is not needed)."""
        while self.job is not None and not self.job.done():
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                await asyncio.to_thread(self._wait_for_room)

    def _wait_for_room(self) -> None:
        assert self.job is not None
        while self.queue.full() and not self.job.done():
            with contextlib.suppress(TimeoutError):
                self.job.exception(timeout=0.05)

    def start(self) -> None:
        """Start the storage thread on the bytes to come."""
        job: Future[files.StagedUpload] = Future()
        job.set_running_or_notify_cancel()

        def run() -> None:
            try:
                job.set_result(files.stage_upload(self.chunks()))
            except BaseException as e:  # noqa: BLE001 - handed to the request
                job.set_exception(e)

        self.job = job
        threading.Thread(target=run, name="upload", daemon=True).start()

    async def flush(self, at_least: int = 1) -> None:
        if len(self.batch) >= at_least:
            data, self.batch = self.batch, bytearray()
            await self.put(data)  # handed over, never written to again: no copy


class _Form:
    """The multipart parser's events, as the parts of one upload form."""

    def __init__(self, feed: _Feed, start: Callable[[], None]):
        self.feed = feed
        self.start = start  # starts the storage thread: called at the file part's headers
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.part: str | None = None  # "file", a field's name, or None (ignored)
        self.file_done = False

    def on_part_begin(self) -> None:
        self.disposition, self.part = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD and b"filename" in options and self.filename is None:
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self.part = FILE_FIELD
            self.start()
        elif name and name != FILE_FIELD:
            self.part = name
            self.fields.setdefault(name, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part == FILE_FIELD:
            self.feed.batch += data[start:end]
        elif self.part is not None:
            field = self.fields[self.part]
            if len(field) + end - start > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field '{self.part}' is longer than "
                                     f"{MAX_FIELD_BYTES} bytes", param=self.part)
            field += data[start:end]

    def on_part_end(self) -> None:
        if self.part == FILE_FIELD:
            self.file_done = True


def _boundary(request: Request) -> bytes:
    media, options = parse_options_header(request.headers.get("content-type"))
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest("the upload must be multipart/form-data with a 'file' part",
                             param=FILE_FIELD)
    return options[b"boundary"]


async def receive_upload(request: Request, project: str) -> File:
    """Stream the request's ``file`` part to storage, then record it for ``project``.

    Raises:
        InvalidRequest: not a multipart form, malformed, or without a file part.
        InvalidDataset, PayloadTooLarge, StorageUnavailable: see
            :func:`api.files.stage_upload`; nothing is kept.
    """
    boundary = _boundary(request)
    feed = _Feed()
    form = _Form(feed, feed.start)
    parser = MultipartParser(boundary, {
        "on_part_begin": form.on_part_begin, "on_part_data": form.on_part_data,
        "on_part_end": form.on_part_end, "on_header_field": form.on_header_field,
        "on_header_value": form.on_header_value, "on_header_end": form.on_header_end,
        "on_headers_finished": form.on_headers_finished,
    })
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                await feed.flush(BATCH)
            parser.finalize()
        except FormParserError as e:
            raise InvalidRequest(f"the upload is not a well-formed multipart form: {e}",
                                 param=FILE_FIELD) from e
        if feed.job is None or not form.file_done:
            raise InvalidRequest("the upload has no complete 'file' part", param=FILE_FIELD)
        await feed.flush()
        await feed.put(None)
        # The storage thread's error, if it refused the file.
        staged = await asyncio.wrap_future(feed.job)
    except BaseException:
        if feed.job is not None:
            await feed.put(None)  # the end of its input, if it still reads
            await _discard(feed.job)
        raise
    purpose = bytes(form.fields.get(PURPOSE_FIELD, DEFAULT_PURPOSE.encode())).decode(
        "utf-8", "replace")
    return await asyncio.to_thread(_record, staged, form.filename or "", purpose, project)


async def _discard(job: Future[files.StagedUpload]) -> None:
    """Wait for the storage thread to end, and drop what it staged."""
    try:
        staged = await asyncio.wrap_future(job)
    except BaseException:  # noqa: BLE001 - it failed: it aborted its own write
        return
    await asyncio.to_thread(staged.abort)


def _record(staged: files.StagedUpload, filename: str, purpose: str, project: str) -> File:
    with session_scope() as session:
        row = files.commit_upload(session, staged, filename or "upload.jsonl", purpose,
                                  project)
        session.expunge(row)
        return row
