"""Which failures mean that a part the service depends on does not answer.

The database, the broker and the storage backend fail in their own libraries' terms:
SQLAlchemy wraps the driver's errors, Celery's sends raise kombu's, redis-py has its own, and
the storage backends raise :class:`~shared.errors.StorageUnavailable` themselves. This module
is the one place that tells an outage (a server stopped, restarting, unreachable, out of
connections) from any other error, and turns it into a
:class:`~shared.errors.DependencyUnavailable`: the API answers it 503 with ``Retry-After``
(``shared/http_errors.py``), and the background threads of the API and the workers wait and
try again, where any other error is a bug that must show.
"""

from __future__ import annotations

import logging

from shared.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    DependencyUnavailable,
)

# SQLite says "database is locked" for a writer that held the file past busy_timeout, and
# "unable to open" / "disk I/O error" for a file it cannot reach. Its other operational errors
# ("no such table", a syntax error) are bugs, not outages.
_SQLITE_OUTAGES = ("database is locked", "database table is locked", "unable to open",
                   "disk i/o error")


def _database_error_types() -> tuple[type[Exception], ...]:
    from sqlalchemy import exc

    # TimeoutError: every pooled connection is busy for pool_timeout s (a database so slow that
    # requests pile up); OperationalError / InterfaceError: the driver lost or never got one.
    return exc.OperationalError, exc.InterfaceError, exc.TimeoutError


def _broker_error_types() -> tuple[type[Exception], ...]:
    types: list[type[Exception]] = []
    try:
        from kombu import exceptions as kombu_errors

        # What Celery's send raises once kombu's retries of a lost connection ran out.
        types += [kombu_errors.OperationalError, kombu_errors.ConnectionError]
    except ImportError:  # pragma: no cover - kombu comes with Celery, a core dependency
        pass
    try:
        from redis import exceptions as redis_errors

        types += [redis_errors.ConnectionError, redis_errors.TimeoutError]
    except ImportError:  # pragma: no cover - redis-py is there only with a Redis broker
        pass
    return tuple(types)


def library_error_types() -> tuple[type[Exception], ...]:
    """The libraries' exception classes among which :func:`unavailable` finds outages: the
    API installs a handler for each (and answers those that are no outage 500)."""
    return (*_database_error_types(), *_broker_error_types())


def _database_outage(exc: BaseException) -> bool:
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.TimeoutError):
        return True
    if not isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy saw the connection drop
        return True
    orig = exc.orig
    if type(orig).__module__.startswith("sqlite3"):
        return any(text in str(orig).lower() for text in _SQLITE_OUTAGES)
    # PostgreSQL (psycopg): connection refused or lost, the server starting or shutting down,
    # too many clients, a statement cancelled by the server. All pass if retried later.
    return True


def unavailable(exc: BaseException) -> DependencyUnavailable | None:
    """The 503 error that ``exc`` (or an error it was raised from) stands for when it means
    that the database, the broker or the storage does not answer; ``None`` for any other
    error."""
    seen: BaseException | None = exc
    for _ in range(8):  # an error raised from an error raised from …: a short chain
        if seen is None:
            return None
        if isinstance(seen, DependencyUnavailable):
            return seen
        if _database_outage(seen):
            return DatabaseUnavailable("The database is not answering; retry shortly.")
        if isinstance(seen, _broker_error_types()):
            return BrokerUnavailable("The message broker is not answering; retry shortly.")
        seen = seen.__cause__
    return None


def describe(exc: BaseException) -> str:
    """One line for a log: which dependency is away, and the library's own words."""
    outage = unavailable(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    what = outage.dependency if outage is not None else "unexpected"
    return f"{what}: {type(exc).__name__}: {first}"


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log a background task's failure that it will try again: an outage in one line (a
    thread that retries every second must not fill the log with tracebacks while a server
    restarts), anything else with its traceback, as the bug it is."""
    if unavailable(exc) is not None:
        logger.warning("%s (%s)", what, describe(exc))
    else:
        logger.error("%s", what, exc_info=exc)
