"""Database and broker backends for test stacks: embedded, or real Redis + PostgreSQL.

A Redis + PostgreSQL stack gets a fresh database (``CREATE DATABASE lf_<random>``, dropped at
teardown) and its own Celery queue on a random Redis db index, so stacks never see each other's
jobs or messages, even when several test runs share the servers.
"""

from __future__ import annotations

import os
import random
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import pytest

EMBEDDED = "embedded"
REDIS_POSTGRES = "redis-postgres"
BACKEND_NAMES = (EMBEDDED, REDIS_POSTGRES)

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Parametrize a test or fixture over both backends: ``@pytest.mark.parametrize("backend",
# BACKENDS)`` or ``@pytest.fixture(params=BACKENDS)``.
BACKENDS = [
    pytest.param(EMBEDDED, id=EMBEDDED),
    pytest.param(REDIS_POSTGRES, marks=[pytest.mark.redis, pytest.mark.postgres],
                 id=REDIS_POSTGRES),
]


def postgres_url() -> str:
    """The PostgreSQL server for tests (``LORAFLEET_TEST_POSTGRES_URL``)."""
    return os.environ.get("LORAFLEET_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def redis_url() -> str:
    """The Redis server for tests (``LORAFLEET_TEST_REDIS_URL``)."""
    return os.environ.get("LORAFLEET_TEST_REDIS_URL") or DEFAULT_REDIS_URL


def unavailable(what: str, error: BaseException) -> None:
    """Skip the test when a server is missing, or fail loudly in CI where it must be there."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = f"{what} is not reachable ({type(error).__name__}: {first_line})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide it", pytrace=False)
    pytest.skip(f"{message}; set LORAFLEET_TEST_POSTGRES_URL / LORAFLEET_TEST_REDIS_URL")


def require_postgres() -> str:
    """The test server URL, after checking that it answers (skips or fails otherwise)."""
    from sqlalchemy import create_engine, text

    url = postgres_url()
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        unavailable(f"PostgreSQL at {url.split('@')[-1]}", e)
    finally:
        engine.dispose()
    return url


def require_redis() -> str:
    """The test Redis URL, after checking that it answers (skips or fails otherwise)."""
    import redis

    url = redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except Exception as e:  # noqa: BLE001
        unavailable(f"Redis at {url}", e)
    finally:
        client.close()
    return url


@dataclass
class Backend:
    """What a stack's processes are told (``env``) and what must be cleaned up afterwards."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    _database: str | None = None
    _admin_url: str | None = None
    _redis_url: str | None = None
    _queue: str | None = None

    @classmethod
    def provision(cls, name: str) -> Backend:
        """Create the isolated database and queue for one stack."""
        if name == EMBEDDED:
            return cls(name)
        if name != REDIS_POSTGRES:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        admin_url = require_postgres()
        base_redis = require_redis()
        database = f"lf_{secrets.token_hex(6)}"
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{database}"'))
        finally:
            engine.dispose()
        db_url = make_url(admin_url).set(database=database).render_as_string(hide_password=False)
        # A random db index plus a queue name of our own: messages of concurrent runs never mix.
        queue = f"lorafleet.test.{secrets.token_hex(4)}"
        parts = urlsplit(base_redis)
        broker = urlunsplit(parts._replace(path=f"/{random.randint(1, 15)}"))
        return cls(
            name,
            env={
                "LORAFLEET_DATABASE_URL": db_url,
                "LORAFLEET_BROKER_URL": broker,
                "LORAFLEET_QUEUE": queue,
            },
            _database=database,
            _admin_url=admin_url,
            _redis_url=broker,
            _queue=queue,
        )

    def cleanup(self) -> None:
        """Drop the database and the queue's Redis keys (after the processes are gone)."""
        if self._database and self._admin_url:
            from sqlalchemy import create_engine, text

            engine = create_engine(self._admin_url, isolation_level="AUTOCOMMIT")
            try:
                with engine.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)'))
            finally:
                engine.dispose()
            self._database = None
        if self._redis_url and self._queue:
            import redis

            client = redis.Redis.from_url(self._redis_url, socket_timeout=3)
            try:
                keys = list(client.scan_iter(match=f"*{self._queue}*"))
                if keys:
                    client.delete(*keys)
            except Exception:  # noqa: BLE001, S110 - leftovers in a test db index are harmless
                pass
            finally:
                client.close()
            self._queue = None
