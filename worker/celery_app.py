"""The Celery worker: the training task, the lease sweeper, and graceful preemption.

``celery -A worker.celery_app worker`` (or ``lorafleet worker``) runs it. Each worker process
runs one job at a time (prefork pool, concurrency 1: one process per GPU); the main process
survives a job that kills its child, and sweeps for jobs whose worker vanished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import psutil
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from shared import lease
from shared.queue import RUN_JOB_TASK, get_celery
from shared.settings import get_settings

log = logging.getLogger(__name__)
app = get_celery()
IN_PROCESS_POOL = False  # set by ``lorafleet worker --pool solo``


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Wake-up for ``job_id``: train it if this worker wins the claim."""
    from worker.runner import run_job as run

    return run(job_id)


def _preempt(signum: int, _frame: Any) -> None:
    from worker.runner import PREEMPT

    log.warning("signal %d: checkpointing and giving the running job back", signum)
    PREEMPT.set()


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # The pool child trains; SIGUSR1 from the main process (on SIGTERM) asks it to checkpoint
    # and hand the job back. Importing the training stack here makes the first job start fast.
    signal.signal(signal.SIGUSR1, _preempt)
    import worker.runner  # noqa: F401


@worker_shutting_down.connect
def _on_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    # SIGTERM reaches only the main process (docker stop, Kubernetes, spot preemption notices);
    # the job runs in a pool child, so pass the request on.
    for child in psutil.Process(os.getpid()).children(recursive=False):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGUSR1)
    if IN_PROCESS_POOL:  # solo pool: the job runs in this very process
        _preempt(signal.SIGTERM, None)


class Sweeper(threading.Thread):
    """Periodically re-queues jobs whose lease expired and re-sends forgotten queued jobs."""

    def __init__(self, interval: float):
        super().__init__(name="lorafleet-sweeper", daemon=True)
        self.interval = interval
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                moved = lease.sweep()
                if moved:
                    log.info("sweeper re-sent %s", ", ".join(moved))
            except Exception:  # database or broker briefly away: try again next round
                log.warning("sweep failed", exc_info=True)


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    Sweeper(get_settings().sweep_seconds).start()
