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
  clients costs about two reads per TTL, and none of them waits;
- while the database does not answer, the last answer read for the job (at most
  ``stale_status_seconds`` old, to a key checked at most that long ago) is served with the
  headers ``X-Lorafleet-Stale: database_unavailable`` and ``Age``; without one, a 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import auth, jobs, presenters
from api.read_cache import ReadCache
from shared.db import session_scope
from shared.dependencies import unavailable
from shared.errors import DatabaseUnavailable
from shared.settings import get_settings

Answer = tuple[str, bytes]  # the job's project, the JSON answer
# The header that marks an answer served from the cache because the database did not answer.
STALE_HEADER = "X-Lorafleet-Stale"


class StatusAnswer(NamedTuple):
    body: bytes  # the JSON of a JobPublic
    headers: dict[str, str]  # STALE_HEADER and Age, for an answer older than the database


class StatusCache(ReadCache[str, Answer]):
    """Job id -> its project's JSON answer (:class:`~api.read_cache.ReadCache`), for
    ``status_cache_seconds``; an answer goes only to the job's own project.

    Args:
        clock: the time in seconds, as :func:`time.monotonic` gives it (tests pass their own).
    """

    def __init__(self, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(lambda: get_settings().status_cache_seconds, max_entries, clock,
                         keep_last=True)

    def get(self, job_id: str, project: str) -> bytes | None:
        """The stored answer, unless it expired or belongs to another project."""
        answer = self.lookup(job_id)
        return answer[1] if answer is not None and answer[0] == project else None

    def put(self, job_id: str, project: str, body: bytes, read_at: float) -> None:
        """Store an answer whose database read began at ``read_at``, unless a newer read or a
        write (:meth:`forget`) came since."""
        self.store(job_id, (project, body), read_at)

    async def answer(self, job_id: str, project: str) -> StatusAnswer:
        """The project's answer: the stored one while it is fresh, else a database read (in
        the thread pool, shared with the project's misses at the same time). A stored answer
        past half its life is read again in the background, so that steady polling never
        waits. A read the database does not answer falls back on the last answer, marked
        stale, if it is at most ``stale_status_seconds`` old.

        Raises:
            NotFound: the project has no such job.
            DatabaseUnavailable: the database does not answer, and no answer is kept.
        """
        def usable(answer: Answer) -> bool:
            return answer[0] == project

        try:
            answer = await self.fetch(job_id, lambda: _read(job_id, None, project),
                                      usable=usable, flight=(job_id, project))
        except Exception as e:
            kept = self.last(job_id, get_settings().stale_status_seconds, usable)
            if kept is None or not isinstance(unavailable(e), DatabaseUnavailable):
                raise
            (_, body), age = kept
            return StatusAnswer(body, {STALE_HEADER: DatabaseUnavailable.code,
                                       "Age": str(int(age))})
        return StatusAnswer(answer[1], {})


status_cache = StatusCache()


def job_json(session: Session, job_id: str, project: str) -> bytes:
    """The job as the route answers it: the bytes FastAPI sends for a ``JobPublic``.

    Raises:
        NotFound: the project has no such job.
    """
    return presenters.job_public(jobs.get_job(session, job_id, project)).model_dump_json(
        by_alias=True).encode()


def _read(job_id: str, authorization: str | None, project: str | None) -> Answer:
    """Authenticate (unless ``project`` is known) and read the job."""
    with session_scope() as session:
        project = project or auth.authenticate(session, authorization)
        return project, job_json(session, job_id, project)


async def job_status(job_id: str, authorization: str | None) -> StatusAnswer:
    """The answer of ``GET /v1/fine_tuning/jobs/{job_id}`` for this Authorization header.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
        NotFound: the key's project has no such job.
        DatabaseUnavailable: the database does not answer, and no answer is kept.
    """
    settings = get_settings()
    if settings.status_cache_seconds <= 0 or settings.auth_cache_seconds <= 0:
        # Either way every request reads the database: key and job in one thread pool call.
        return StatusAnswer((await run_in_threadpool(_read, job_id, authorization, None))[1],
                            {})
    project = await auth.authenticate_async(authorization, settings.stale_status_seconds)
    return await status_cache.answer(job_id, project)
