"""API keys: created and revoked by the operator, checked on every ``/v1`` request.

A key checked recently is trusted for ``auth_cache_seconds`` (:data:`key_cache`): routes with
a session check keys with :func:`authenticate`, the async job status route with
:func:`authenticate_async`, which stays on the event loop for a cached key.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.flights import Flights
from shared.db import session_scope
from shared.dependencies import unavailable
from shared.errors import DatabaseUnavailable, InvalidRequest, LorafleetError, NotFound
from shared.ids import new_id, now
from shared.models import ApiKey
from shared.settings import get_settings

KEY_PREFIX = "lf-"
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class Unauthorized(LorafleetError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


def _hash(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no password stretching).
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache:
    """Projects of keys checked recently, by key hash, for ``auth_cache_seconds``.

    Only keys that were found are kept, so an unknown key costs a database read every time
    (an attacker cannot fill the cache). Revoking a key in this process drops it at once;
    other API processes notice within the TTL. Thread-safe: sync routes fill it from the
    thread pool while async routes read it on the event loop.

    Args:
        clock: the time in seconds, as :func:`time.monotonic` gives it (tests pass their own).
    """

    def __init__(self, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        # key hash -> (project, when its check began on `clock`); oldest first
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def lookup(self, key_hash: str, ttl: float | None = None) -> tuple[str, float] | None:
        """The key's project and when it was checked, unless that was ``ttl`` seconds ago or
        more (default: ``auth_cache_seconds``)."""
        with self._lock:
            hit = self._entries.get(key_hash)
        ttl = get_settings().auth_cache_seconds if ttl is None else ttl
        if hit is None or hit[1] + ttl <= self.clock():
            return None
        return hit

    def get(self, key_hash: str) -> str | None:
        hit = self.lookup(key_hash)
        return hit[0] if hit else None

    def put(self, key_hash: str, project: str, checked_at: float) -> None:
        """Keep a key found by a check that began at ``checked_at``."""
        if get_settings().auth_cache_seconds <= 0:
            return
        with self._lock:
            self._entries[key_hash] = (project, checked_at)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


key_cache = KeyCache()
# Key checks in flight on the event loop (:func:`authenticate_async`), by key hash.
key_checks = Flights()


def create_key(session: Session, project: str, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for ``project``; returns the row and the secret (shown once)."""
    if not PROJECT_RE.match(project):
        raise InvalidRequest("project names are 1-64 letters, digits, '_' or '-'",
                             param="project")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), project=project, name=name[:128], prefix=secret[:10],
                 key_hash=_hash(secret), created_at=now())
    session.add(row)
    session.flush()
    return row, secret


def list_keys(session: Session, project: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.seq)
    if project:
        query = query.where(ApiKey.project == project)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> None:
    """Revoke a key. API processes that checked it recently accept it for up to
    ``auth_cache_seconds`` more; this process forgets it at once (a request it checks while
    the revoke is not yet committed may still keep it for that long).

    Raises:
        NotFound: no active key has this id.
    """
    key_hash = session.scalar(update(ApiKey)
                              .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                              .values(revoked_at=now()).returning(ApiKey.key_hash))
    if key_hash is None:
        raise NotFound(f"No such active key: {key_id}", param="key_id")
    key_cache.drop(key_hash)


def hash_header(authorization: str | None) -> str:
    """The hash of the key in an ``Authorization`` header, as :data:`key_cache` knows it.

    Raises:
        Unauthorized: no header, or one that is not ``Bearer <key>``.
    """
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'",
                           code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'")
    return _hash(key.strip())


def check_key(session: Session, key_hash: str) -> str:
    """The project of a key, from the database; kept in :data:`key_cache`.

    Raises:
        Unauthorized: an unknown or revoked key (forgotten by the cache).
    """
    checked_at = key_cache.clock()
    project = session.scalar(select(ApiKey.project).where(
        ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    if project is None:
        key_cache.drop(key_hash)
        raise Unauthorized("Incorrect API key provided")
    key_cache.put(key_hash, project, checked_at)
    return project


def authenticate(session: Session, authorization: str | None) -> str:
    """The project of a ``Bearer`` key (from :data:`key_cache` when it was checked recently).

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    key_hash = hash_header(authorization)
    return key_cache.get(key_hash) or check_key(session, key_hash)


def _check_key(key_hash: str) -> str:
    with session_scope() as session:
        return check_key(session, key_hash)


async def authenticate_async(authorization: str | None, stale_if_error: float = 0.0) -> str:
    """:func:`authenticate` without a session, for async routes. A key not checked within
    the TTL is checked in the thread pool, once for all the requests that carry it; one past
    half its TTL is served from :data:`key_cache` and checked again in the background.

    Args:
        stale_if_error: while the database does not answer, accept a key that was checked
            at most this many seconds ago (0: none).

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
        DatabaseUnavailable: the key must be checked and the database does not answer.
    """
    key_hash = hash_header(authorization)
    ttl = get_settings().auth_cache_seconds
    at = key_cache.clock()
    hit = key_cache.lookup(key_hash)
    since = max(hit[1], at - ttl) if hit else at - ttl
    if hit is None:
        try:
            return await asyncio.shield(
                key_checks.join(key_hash, at, since, _check_key, key_hash))
        except Exception as e:
            kept = key_cache.lookup(key_hash, stale_if_error) if stale_if_error > 0 else None
            if kept is None or not isinstance(unavailable(e), DatabaseUnavailable):
                raise
            return kept[0]
    if at - hit[1] > ttl / 2:
        key_checks.join(key_hash, at, since, _check_key, key_hash)
    return hit[0]
