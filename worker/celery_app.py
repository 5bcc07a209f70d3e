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
from collections.abc import Callable
from typing import Any

import billiard.pool
import psutil
from celery.exceptions import Reject
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from shared import deletions, outbox
from shared.dependencies import log_failure
from shared.queue import RUN_JOB_TASK, get_celery
from shared.settings import get_settings
from worker import devices
from worker import metrics as worker_metrics
from worker.sweeper import sweep

log = logging.getLogger(__name__)
app = get_celery()
# Before anything starts CUDA: this process and the pool processes it forks see only the GPU
# that LORAFLEET_DEVICE names (a GPU this node lacks stops the worker here, with the setting).
devices.pin(get_settings().device)
IN_PROCESS_POOL = False  # set by ``lorafleet worker --pool solo``


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Wake-up for ``job_id``: train it if this worker wins the claim."""
    from worker.runner import PREEMPT
    from worker.runner import run_job as run

    if PREEMPT.is_set():
        # This worker is shutting down but still receives messages until its last job ends,
        # among them the wake-up of the job it just gave back: leave it to another worker.
        raise Reject("worker shutting down", requeue=True)
    try:
        return run(job_id)
    finally:
        worker_metrics.training_idle()


def _preempt(signum: int, _frame: Any) -> None:
    from worker.runner import PREEMPT

    log.warning("signal %d: checkpointing and giving the running job back", signum)
    PREEMPT.set()


# No task here has a soft time limit, and SIGUSR1 means "preempt" in a pool process; billiard
# would install its soft-time-limit handler on SIGUSR1 in every pool process it forks, and an
# idle one would then die of SoftTimeLimitExceeded when the worker is stopped.
billiard.pool.soft_timeout_sighandler = _preempt


@worker_init.connect
def _preload(**_: Any) -> None:
    # Before anything creates a metric: the pool processes this one forks count too.
    worker_metrics.enable(get_settings())
    # Import the training stack once, before the pool forks: the first pool child and every
    # replacement of a child that died (a crashed job) start training without seconds of imports.
    import worker.runner  # noqa: F401


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # The pool child trains; SIGUSR1 from the main process (on SIGTERM) asks it to checkpoint
    # and hand the job back.
    signal.signal(signal.SIGUSR1, _preempt)
    # A child forked after the sweeper ran inherits the main process's database connections;
    # sharing a connection between processes corrupts it, so the child opens its own.
    from shared import db

    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose(close=False)
    import worker.runner  # noqa: F401

    worker_metrics.training_idle()  # a crashed predecessor's throughput is not this one's
    log.info("pool process %d ready to train", os.getpid())


@worker_shutting_down.connect
def _on_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    # SIGTERM reaches only the main process (docker stop, Kubernetes, spot preemption notices);
    # the job runs in a pool child, so pass the request on.
    children = psutil.Process(os.getpid()).children(recursive=False)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGUSR1)
    if IN_PROCESS_POOL:  # solo pool: the job runs in this very process
        _preempt(signal.SIGTERM, None)
    elif children:
        # Warm shutdown waits for the job; past the grace period the checkpoint is not coming
        # (a step slower than the grace): exit anyway, the lease brings the job back.
        grace = get_settings().preempt_grace_seconds
        timer = threading.Timer(grace, _kill_stragglers, args=(children, grace))
        timer.daemon = True
        timer.start()


def _kill_stragglers(children: list[psutil.Process], grace: float) -> None:
    for child in children:
        if child.is_running():  # is_running also tells a reused pid apart
            log.warning("pool process %d still busy %.0fs after SIGTERM; killing it", child.pid,
                        grace)
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class Periodic(threading.Thread):
    """Runs ``task`` every ``interval`` s; a round that fails is logged as ``failed`` and the
    next round tries again."""

    def __init__(self, name: str, interval: float, task: Callable[[], None], failed: str):
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.task = task
        self.failed = failed
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.task()
            except Exception as e:  # database or broker briefly away: try again next round
                log_failure(log, self.failed, e)


def _sweep() -> None:
    """Re-queue jobs whose lease expired and re-send forgotten queued jobs."""
    moved = sweep()
    if moved:
        log.info("sweeper re-sent %s", ", ".join(moved))


def _purge() -> None:
    """Delete from storage what deletions committed and the store did not take then."""
    purged = deletions.purge_pending()
    if purged:
        log.info("purger deleted %d storage objects or folders", purged)


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    settings = get_settings()
    if settings.worker_metrics_port is not None:
        try:
            worker_metrics.serve(settings)
        except OSError as e:
            log.error("cannot serve worker metrics on %s:%s: %s", settings.worker_metrics_host,
                      settings.worker_metrics_port, e)
    Periodic("lorafleet-sweeper", settings.sweep_seconds, _sweep, "sweep failed").start()
    # Storage deletions in a thread of their own: a store that hangs must not delay the sweep.
    Periodic("lorafleet-purger", settings.sweep_seconds, _purge, "purge failed").start()
    # Webhooks in a thread of their own: a slow receiver must not delay the lease sweep.
    outbox.Dispatcher(settings.webhook_poll_seconds).start()
