"""The one place that reads the environment: every setting has the prefix ``LORAFLEET_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration; ``LORAFLEET_<NAME>`` overrides a field (``LORAFLEET_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    # --- where things live -------------------------------------------------------------
    storage_dir: Path = Field(
        Path("lorafleet-data"),
        description="Shared storage: uploads, checkpoints, adapters, caches. Must be the same "
        "path on the API and on every worker.",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL. Empty: an SQLite file in the storage folder. "
        "Production: postgresql+psycopg://user:pass@host/db",
    )
    broker_url: str = Field(
        "",
        description="Celery broker URL. Empty: kombu's filesystem transport in the storage folder "
        "(no server needed). Production: redis://host:6379/0",
    )
    broker_visibility_timeout: int = Field(
        3600,
        ge=1,
        description="Redis visibility timeout (s). Redelivery of a running job is harmless: the "
        "database claim decides who trains.",
    )
    broker_poll_interval: float = Field(
        0.1, gt=0, description="Polling interval (s) of the embedded filesystem broker."
    )
    queue: str = Field("lorafleet.train", description="Celery queue that training jobs go to.")

    # --- API server ----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auto_migrate: bool = Field(
        True, description="Upgrade the database schema when the API starts."
    )

    # --- input limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Largest upload (bytes).")
    max_upload_lines: int = Field(1_000_000, ge=1, description="Most JSONL lines in one upload.")
    max_record_chars: int = Field(200_000, ge=1, description="Longest JSONL line (characters).")
    max_length_limit: int = Field(8192, ge=16, description="Largest accepted max_length.")
    max_lora_r: int = Field(256, ge=1, description="Largest accepted LoRA rank.")
    max_steps_limit: int = Field(1_000_000, ge=1, description="Largest accepted max_steps.")
    max_epochs_limit: int = Field(100, ge=1, description="Largest accepted n_epochs.")
    models_dir: Path | None = Field(
        None,
        description="Folder under which local base models may be named by path. Unset: any "
        "readable local path is accepted (single-user installs).",
    )

    # --- job lifecycle -------------------------------------------------------------------
    lease_seconds: float = Field(
        15.0, gt=0, description="A running job whose heartbeat is older than this is re-queued."
    )
    heartbeat_seconds: float = Field(3.0, gt=0, description="Worker heartbeat interval (s).")
    sweep_seconds: float = Field(2.0, gt=0, description="How often workers look for lost jobs.")
    requeue_after_seconds: float = Field(
        30.0,
        gt=0,
        description="A queued job that no worker claimed for this long is sent to the broker again "
        "(covers lost broker messages, e.g. a Redis restart).",
    )
    max_attempts: int = Field(
        3, ge=1, description="A job that loses its worker or fails transiently this often fails."
    )
    retry_backoff_seconds: float = Field(
        2.0, ge=0, description="Delay before a retried attempt; doubles with each failure."
    )
    keep_checkpoints: int = Field(
        3, ge=1, description="Complete checkpoints kept per job (plus the final adapter)."
    )
    preempt_grace_seconds: float = Field(
        60.0, gt=0, description="On SIGTERM, time allowed to write a checkpoint before exit."
    )

    # --- training defaults ---------------------------------------------------------------
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.storage_dir / 'lorafleet.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.storage_dir / "broker").resolve()

    @property
    def uses_embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
