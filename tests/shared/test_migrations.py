"""The migrations build exactly the schema that ``shared/models.py`` declares, on both backends,
and go down again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.backends import require_postgres


def schema_drift(url: str | None = None) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from shared.db import get_engine
    from shared.models import Base

    engine = create_engine(url) if url else get_engine()
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        if url:
            engine.dispose()


def test_migrations_match_the_models_on_sqlite(settings_env: Callable[..., Any]) -> None:
    from alembic import command

    from shared.migrate import alembic_config, upgrade

    settings_env()
    upgrade()
    assert schema_drift() == []
    command.downgrade(alembic_config(), "base")
    upgrade()
    assert schema_drift() == []


@pytest.mark.postgres
def test_migrations_match_the_models_on_postgresql() -> None:
    import uuid

    from sqlalchemy import create_engine, text

    from shared.migrate import upgrade

    admin = require_postgres()
    name = f"lorafleet_migrations_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        assert schema_drift(url) == []
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        engine.dispose()
