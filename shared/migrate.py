"""Schema migrations (Alembic), runnable without an ini file."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from shared.settings import get_settings


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(list(migrations.__path__)[0])))
    cfg.set_main_option("sqlalchemy.url", url or get_settings().effective_database_url)
    return cfg


def upgrade(url: str | None = None) -> None:
    """Bring the database at ``url`` (default: the configured one) to the newest schema."""
    settings = get_settings()
    if url is None and settings.effective_database_url.startswith("sqlite"):
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
