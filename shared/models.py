"""Database schema: the job row is the single source of truth for a job's state."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BigInteger autoincrement keys fall back to INTEGER on SQLite so that ROWID aliasing still works.
SeqKey = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class File(Base):
    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(64), index=True, default="default")
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    path: Mapped[str] = mapped_column(Text)  # relative to the storage folder
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    record_format: Mapped[str] = mapped_column(String(32), default="custom")
    columns: Mapped[list[Any]] = mapped_column(default=list)  # keys seen in the records
    sha256: Mapped[str] = mapped_column(String(64))


class Job(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(64), index=True, default="default")
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    model: Mapped[str] = mapped_column(Text)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(32), index=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), default=None)
    # The full, validated training specification (shared.schemas.TrainingSpec as JSON).
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(Text, default=None)
    adapter_dir: Mapped[str | None] = mapped_column(Text, default=None)
    # Set when the fine-tuned model is deleted: the job keeps its name, the files are gone.
    fine_tuned_model_deleted_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    trainable_parameters: Mapped[int | None] = mapped_column(BigInteger, default=None)
    total_parameters: Mapped[int | None] = mapped_column(BigInteger, default=None)
    dataset_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Ids of the files the job produced (its per-step metrics, purpose fine-tune-results).
    result_files: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    # Base vs fine-tuned scores on the validation records (shared.schemas.Evaluation as JSON).
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    # --- lifecycle: lease, fencing, retries ---------------------------------------------
    # ``attempt`` is the fencing token: each claim bumps it, and every write a worker makes is
    # conditional on the value it claimed with.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # attempts that ended badly
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, default=None)
    not_before: Mapped[float | None] = mapped_column(Float, default=None)  # retry backoff
    enqueued_at: Mapped[float | None] = mapped_column(Float, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_good_checkpoint: Mapped[str | None] = mapped_column(Text, default=None)
    last_good_step: Mapped[int | None] = mapped_column(Integer, default=None)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer, default=None)

    __table_args__ = (Index("ix_jobs_project_seq", "project", "seq"),)


class JobEvent(Base):
    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    step_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempt: Mapped[int] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)  # removed by retention


class JobAttempt(Base):
    """One claim of a job by a worker: the fencing record (who trained when)."""

    __tablename__ = "job_attempts"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_seen_at: Mapped[float | None] = mapped_column(Float, default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    start_step: Mapped[int] = mapped_column(Integer, default=0)


class ApiKey(Base):
    """An API key of a project (tenant). Only a hash of the key is stored."""

    __tablename__ = "api_keys"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class WebhookEndpoint(Base):
    """A project's webhook receiver: where its jobs' events are sent, and the signing secret."""

    __tablename__ = "webhook_endpoints"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(default=list)
    secret: Mapped[str] = mapped_column(String(128))  # whsec_<base64>: needed to sign
    # After a rotation that keeps the old secret: sends carry both signatures until then.
    previous_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_secret_until: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the change it
    reports and sent (again) until the receiver answers 2xx or the attempts run out."""

    __tablename__ = "webhook_deliveries"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))  # evt_…, the webhook-id of every send
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # Bumped by each claim: the fencing token of the sender that holds the row.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, default=None)

    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_event", "endpoint_id", "event_id", unique=True),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )


class StorageDeletion(Base):
    """The outbox of :mod:`shared.deletions`: objects the database has let go of (a deleted
    model's adapter, a deleted file), written in the transaction of the deletion and removed
    once storage has deleted them."""

    __tablename__ = "storage_deletions"

    seq: Mapped[int] = mapped_column(SeqKey, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Text)
    # A committed folder (its manifest goes first, then everything under it), else one object.
    folder: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
