"""Engine and sessions. SQLite (embedded default) and PostgreSQL share the same code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import get_settings

# Seconds to wait for a PostgreSQL connection before the request fails (503).
CONNECT_TIMEOUT_S = 5


def make_engine(url: str) -> Engine:
    """Create an engine with the pragmas each backend needs for several processes at once."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes; busy_timeout rides out the short
            # exclusive locks that the workers' claims and heartbeats take.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        # A server that does not answer at all (a host gone, packets dropped) fails a
        # connection in seconds, and the request with a 503, rather than holding a thread
        # for the operating system's TCP timeout (minutes). The URL may set its own.
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args=connect_args)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.effective_database_url.startswith("sqlite"):
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.effective_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def execute_count(session: Session, statement: Executable) -> int:
    """Run an UPDATE or DELETE; the number of rows it matched (0 when a condition failed)."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount


# Keys of PostgreSQL advisory locks (first half of the pair; the second is the project).
QUEUE_LOCK, RUNNING_LOCK = 1, 2


def lock_project(session: Session, project: str, purpose: int) -> None:
    """Serialise one kind of per-project admission decision (``QUEUE_LOCK``, ``RUNNING_LOCK``)
    until the transaction ends. PostgreSQL only: SQLite runs one writer at a time already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(purpose, func.hashtext(project))))
