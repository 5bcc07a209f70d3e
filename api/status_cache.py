"""Job status answers kept for ``status_cache_seconds``: what polling clients read.

``GET /v1/fine_tuning/jobs/{id}`` is the route every client polls while its job trains. An
answer read from the database is kept as the JSON bytes sent, and the next requests of the
job's project get those bytes on the event loop: no thread pool, no session, no key lookup
(keys come from ``api.auth.key_cache``, checked again in the background, as answers are,
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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import auth, jobs, presenters
from api.flights import Flights
from shared.db import session_scope
from shared.settings import get_settings


@dataclass(slots=True)
class _Entry:
    read_at: float  # when the read began, or the job was forgotten (on the cache's clock)
    expires: float
    project: str | None = None  # None: forgotten, the next request reads the database
    body: bytes = b""


class StatusCache:
    """Job id -> the project's JSON answer, bounded to ``max_entries`` (oldest go first).

    Thread-safe: the thread pool stores answers and forgets jobs; the event loop reads them.
    Reads in flight (:meth:`answer`) live on the event loop only.

    Args:
        clock: the time in seconds, as :func:`time.monotonic` gives it (tests pass their own).
    """

    def __init__(self, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights = Flights()

    def get(self, job_id: str, project: str) -> bytes | None:
        """The stored answer, unless it expired or belongs to another project."""
        with self._lock:
            entry = self._entries.get(job_id)
        if entry is None or entry.project != project or entry.expires <= self.clock():
            return None
        return entry.body

    def put(self, job_id: str, project: str, body: bytes, read_at: float) -> None:
        """Store an answer whose database read began at ``read_at``, unless a newer read or a
        write (:meth:`forget`) came since."""
        ttl = get_settings().status_cache_seconds
        now = self.clock()
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
        now = self.clock()
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
        now = self.clock()
        with self._lock:
            entry = self._entries.get(job_id)
        # A read is shared only if it began after the job's last write and last stored read.
        since = max(entry.read_at, now - ttl) if entry else now - ttl
        if entry is None or entry.project != project or entry.expires <= now:
            # Shielded: a client that goes away does not cancel the read others wait for.
            return await asyncio.shield(
                self._flights.join((job_id, project), now, since, _read, job_id, None, project))
        if now - entry.read_at > ttl / 2:
            self._flights.join((job_id, project), now, since, _read, job_id, None, project)
        return entry.body


status_cache = StatusCache()


def job_json(session: Session, job_id: str, project: str) -> bytes:
    """The job as the route answers it: the bytes FastAPI sends for a ``JobPublic``.

    Raises:
        NotFound: the project has no such job.
    """
    return presenters.job_public(jobs.get_job(session, job_id, project)).model_dump_json(
        by_alias=True).encode()


def _read(job_id: str, authorization: str | None, project: str | None) -> bytes:
    """Authenticate (unless ``project`` is known) and read the job; store the answer."""
    started = status_cache.clock()
    with session_scope() as session:
        project = project or auth.authenticate(session, authorization)
        body = job_json(session, job_id, project)
    status_cache.put(job_id, project, body, started)
    return body


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
    return await status_cache.answer(job_id, await auth.authenticate_async(authorization))
