"""Job status answers kept for ``status_cache_seconds``: what polling clients read.

``GET /v1/fine_tuning/jobs/{id}`` is the route every client polls while its job trains. An
answer read from the database is kept as the JSON bytes sent, and the next requests of the
job's project get those bytes on the event loop: no thread pool, no session, no key lookup
(keys come from ``shared.keys.key_cache``, checked again in the background, as answers are,
once past half their TTL). What a client can rely on:

- an answer is at most ``status_cache_seconds`` older than the database (counted from when its
  read began), so a worker's progress shows up that much later at most;
- a write through this process (a cancel) forgets the job once committed, and an answer read
  before the write is neither stored nor shared after it: a client reads its own writes;
- an answer goes only to the job's own project; any other project's request reads the
  database and gets its 404 there;
- requests that miss at the same time share one database read, and an answer past half its
  life is read again in the background while it is still served: a job polled by many
  clients costs about two reads per TTL, and none of them waits.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared import jobs, keys
from shared.db import session_scope
from shared.settings import get_settings

T = TypeVar("T")


class Flights:
    """Database reads in flight, by what they read: requests that need the same read at the
    same time share one. Event loop only."""

    def __init__(self) -> None:
        self._running: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}

    def join(self, key: Hashable, not_before: float, fn: Callable[..., T], *args: Any
             ) -> asyncio.Future[T]:
        """The read of ``key`` in flight if it began at ``not_before`` or later, else a new
        one: ``fn(*args)`` in the thread pool."""
        running = self._running.get(key)
        if running is None or running[0] < not_before:
            future = asyncio.ensure_future(run_in_threadpool(fn, *args))
            running = self._running[key] = (time.monotonic(), future)
            future.add_done_callback(functools.partial(self._landed, key, running))
        return running[1]

    def __len__(self) -> int:
        return len(self._running)

    def clear(self) -> None:
        self._running.clear()

    def _landed(self, key: Hashable, running: tuple[float, asyncio.Future[Any]],
                future: asyncio.Future[Any]) -> None:
        if self._running.get(key) is running:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved: nobody may be left to await a 401 or 404


@dataclass(slots=True)
class _Entry:
    read_at: float  # monotonic time the read began, or the job was forgotten
    expires: float
    project: str | None = None  # None: forgotten, the next request reads the database
    body: bytes = b""


class StatusCache:
    """Job id -> the project's JSON answer, bounded to ``max_entries`` (oldest go first).

    Thread-safe: the thread pool stores answers and forgets jobs; the event loop reads them.
    Reads in flight (:meth:`answer`) live on the event loop only.
    """

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights = Flights()

    def get(self, job_id: str, project: str) -> bytes | None:
        """The stored answer, unless it expired or belongs to another project."""
        with self._lock:
            entry = self._entries.get(job_id)
        if entry is None or entry.project != project or entry.expires <= time.monotonic():
            return None
        return entry.body

    def put(self, job_id: str, project: str, body: bytes, read_at: float) -> None:
        """Store an answer whose database read began at ``read_at``, unless a newer read or a
        write (:meth:`forget`) came since."""
        ttl = get_settings().status_cache_seconds
        now = time.monotonic()
        if read_at + ttl <= now:
            return
        with self._lock:
            current = self._entries.get(job_id)
            if current is not None and current.read_at > read_at:
                return
            self._store(job_id, _Entry(read_at, read_at + ttl, project, body), now)

    def forget(self, job_id: str) -> None:
        """Call after a write to the job is committed: the next request reads the database,
        and reads that began before now are not kept."""
        ttl = get_settings().status_cache_seconds
        now = time.monotonic()
        with self._lock:
            self._store(job_id, _Entry(now, now + ttl), now)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        self._flights.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, job_id: str, entry: _Entry, now: float) -> None:
        self._entries[job_id] = entry
        self._entries.move_to_end(job_id)
        while self._entries and (len(self._entries) > self.max_entries
                                 or next(iter(self._entries.values())).expires <= now):
            self._entries.popitem(last=False)

    async def answer(self, job_id: str, project: str) -> bytes:
        """The project's answer: the stored one while it is fresh, else a database read (in
        the thread pool, shared with the misses at the same time). A stored answer past half
        its life is read again in the background, so that steady polling never waits."""
        ttl = get_settings().status_cache_seconds
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(job_id)
        # A read is shared only if it began after the job's last write and last stored read.
        since = max(entry.read_at, now - ttl) if entry else now - ttl
        if entry is None or entry.project != project or entry.expires <= now:
            # Shielded: a client that goes away does not cancel the read others wait for.
            return await asyncio.shield(
                self._flights.join((job_id, project), since, _read, job_id, None, project))
        if now - entry.read_at > ttl / 2:
            self._flights.join((job_id, project), since, _read, job_id, None, project)
        return entry.body


status_cache = StatusCache()


def job_json(session: Session, job_id: str, project: str) -> bytes:
    """The job as the route answers it: the bytes FastAPI sends for a ``JobPublic``.

    Raises:
        NotFound: the project has no such job.
    """
    return jobs.job_public(jobs.get_job(session, job_id, project)).model_dump_json(
        by_alias=True).encode()


def _read(job_id: str, authorization: str | None, project: str | None) -> bytes:
    """Authenticate (unless ``project`` is known) and read the job; store the answer."""
    started = time.monotonic()
    with session_scope() as session:
        project = project or keys.authenticate(session, authorization)
        body = job_json(session, job_id, project)
    status_cache.put(job_id, project, body, started)
    return body


key_checks = Flights()


def _check_key(key_hash: str) -> str:
    with session_scope() as session:
        return keys.check_key(session, key_hash)


async def _project(authorization: str | None) -> str:
    """The key's project from ``shared.keys.key_cache``. A key not checked within the TTL is
    checked in the thread pool, once for all the requests that carry it; one past half its
    TTL is checked again in the background.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    key_hash = keys.hash_header(authorization)
    ttl = get_settings().auth_cache_seconds
    now = time.monotonic()
    hit = keys.key_cache.lookup(key_hash)
    since = max(hit[1], now - ttl) if hit else now - ttl
    if hit is None:
        return await asyncio.shield(key_checks.join(key_hash, since, _check_key, key_hash))
    if now - hit[1] > ttl / 2:
        key_checks.join(key_hash, since, _check_key, key_hash)
    return hit[0]


async def job_status(job_id: str, authorization: str | None) -> bytes:
    """The answer of ``GET /v1/fine_tuning/jobs/{job_id}`` for this Authorization header.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
        NotFound: the key's project has no such job.
    """
    settings = get_settings()
    if settings.status_cache_seconds <= 0 or settings.auth_cache_seconds <= 0:
        # Either way every request reads the database: key and job in one thread pool call.
        return await run_in_threadpool(_read, job_id, authorization, None)
    return await status_cache.answer(job_id, await _project(authorization))
