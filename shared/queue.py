"""The Celery application, configured once for both the API (which only sends) and workers.

The broker carries wake-up calls, not truth: a message says "job X may be ready", and the worker
that receives it must still claim the job in the database (see ``shared.lifecycle``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from shared.broker import TRANSPORT
from shared.settings import Settings, get_settings

RUN_JOB_TASK = "lorafleet.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings, chosen for hours-long tasks (see docs/operations in the README)."""
    transport: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if settings.uses_embedded_broker:
        extra["broker_transport"] = TRANSPORT  # kombu's filesystem transport, whole messages
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_poll_interval,
        }
    elif settings.effective_broker_url.startswith(("redis://", "rediss://")):
        transport = {
            # Redelivery after this many seconds is harmless (the claim decides who trains) but
            # wasteful, so it is long; lost messages are re-sent by the sweeper instead.
            "visibility_timeout": settings.broker_visibility_timeout,
        }
    return {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # A worker that loses the broker keeps training and reconnects for as long as it
        # takes; Celery's default gives up after 100 tries (about 45 minutes) and stops the
        # worker, job and all.
        "broker_connection_max_retries": None,
        "task_default_queue": settings.queue,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # Ack after the task, and give a task back if its worker process dies, so a crash never
        # loses a job silently; duplicates are filtered by the database claim.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One job per worker process at a time: a GPU trains one job.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # A training task is stopped by our own cancellation/lease logic, never by time limits.
        "task_time_limit": None,
        "task_soft_time_limit": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 4,
        **extra,
    }


@lru_cache
def get_celery() -> Celery:
    app = Celery("lorafleet")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue_job(job_id: str, countdown: float | None = None) -> None:
    """Send a wake-up for ``job_id`` to the training queue."""
    get_celery().send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=get_settings().queue,
        countdown=countdown if countdown and countdown > 0 else None,
    )
