"""What counts as a dependency that does not answer (``shared.dependencies``): the errors the
libraries raise when a server is away become 503s; the same classes raised by a bug do not."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import kombu.exceptions
import pytest
import redis.exceptions
from sqlalchemy import create_engine, exc, text

from shared.dependencies import unavailable
from shared.errors import BrokerUnavailable, DatabaseUnavailable, StorageUnavailable
from tests.support.processes import free_port


def _sqlite_error(message: str) -> exc.OperationalError:
    return exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))


def test_a_postgres_server_that_refuses_connections_is_the_database_away() -> None:
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    try:
        with pytest.raises(exc.OperationalError) as refused, engine.connect():
            pass
    finally:
        engine.dispose()

    outage = unavailable(refused.value)

    assert isinstance(outage, DatabaseUnavailable)
    assert outage.status == 503 and outage.headers["Retry-After"].isdigit()


def test_sqlite_locked_is_an_outage_and_a_missing_table_a_bug(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with pytest.raises(exc.OperationalError) as missing, engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    finally:
        engine.dispose()

    assert unavailable(missing.value) is None
    assert isinstance(unavailable(_sqlite_error("database is locked")), DatabaseUnavailable)


def test_a_broker_that_does_not_answer() -> None:
    for error in (kombu.exceptions.OperationalError("Error 111 connecting"),
                  redis.exceptions.ConnectionError("Connection closed by server."),
                  redis.exceptions.TimeoutError("Timeout reading from socket")):
        assert isinstance(unavailable(error), BrokerUnavailable), error


def test_an_error_raised_from_an_outage_is_one_and_others_are_not() -> None:
    storage = StorageUnavailable("the object store does not answer")
    try:
        try:
            raise _sqlite_error("database is locked")
        except exc.OperationalError as e:
            raise RuntimeError("while saving") from e
    except RuntimeError as e:
        wrapped = e

    assert unavailable(storage) is storage
    assert isinstance(unavailable(wrapped), DatabaseUnavailable)
    assert unavailable(RuntimeError("a bug")) is None
    assert unavailable(ValueError("bad input")) is None
