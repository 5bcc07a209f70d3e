"""A worker's Prometheus metrics, served on its own port (``LORAFLEET_WORKER_METRICS_PORT``).

What a worker counts: the job lifecycle transitions it makes (:mod:`shared.metrics`: attempts,
re-queues, preemptions, lease losses, job durations, webhook sends) and its training
throughput (:func:`training_progress`, from the job's progress hooks).

A worker is two processes: the main one (the sweeper, the webhook dispatcher) and the pool
process that trains. ``prometheus_client``'s multiprocess mode adds both up: each process
writes its values to files in a folder of this worker's own, and the main process serves what
the files hold. A pool process that crashes keeps its counts there, and its replacement starts
from them. :func:`enable` must run before any metric is created (the metrics of
:mod:`shared.metrics` and this module are created on first use for that reason).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from shared import metrics as shared_metrics
from shared.lifecycle import Claim
from shared.schemas import MethodType
from shared.settings import Settings

log = logging.getLogger(__name__)

# From a tiny model on a CPU (milliseconds) to a large one on a GPU with gradient accumulation.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class TrainingMetrics:
    steps: Counter
    tokens: Counter
    step_duration: Histogram
    tokens_per_second: Gauge


@cache
def training_metrics() -> TrainingMetrics:
    """This process's training metrics (created, and registered, on first call). Steps,
    tokens and step times are labelled with the job's ``method`` (a DPO step runs the policy
    and the reference on two answers: its time is not a supervised step's); every method's
    series exists from the start, at 0."""
    metrics = TrainingMetrics(
        steps=Counter("lorafleet_training_steps_total",
                      "Optimizer steps this worker trained, by training method.", ["method"]),
        tokens=Counter("lorafleet_training_tokens_total",
                       "Tokens this worker trained on (the jobs' trained_tokens), by training "
                       "method.", ["method"]),
        step_duration=Histogram("lorafleet_training_step_duration_seconds",
                                "Time per optimizer step, averaged over each progress report "
                                "(every logged step), by training method.", ["method"],
                                buckets=STEP_BUCKETS),
        # The pool process that trains sets it, and a new one resets it: the last write wins.
        tokens_per_second=Gauge("lorafleet_training_tokens_per_second",
                                "Training throughput of the job this worker trains (as the "
                                "job reports it); 0 while it trains none.",
                                multiprocess_mode="mostrecent"),
    )
    for method in get_args(MethodType):
        for family in (metrics.steps, metrics.tokens, metrics.step_duration):
            family.labels(method)
    return metrics


def job_method(claim: Claim) -> str:
    """The training method of the claimed job (its ``TrainingSpec.method``)."""
    method = claim.spec.get("method")
    return method if method in get_args(MethodType) else "supervised"


# --------------------------------------------------------------------------- training
@dataclass
class _Window:
    """Where the attempt being trained stood at its previous progress report."""

    job_id: str
    attempt: int
    step: int
    tokens: int | None  # None: unknown until the first report (a resumed attempt)
    at: float | None  # None: no report yet (the time before it includes loading the model)


_window: _Window | None = None


def training_progress(claim: Claim, step: int, trained_tokens: int,
                      tokens_per_second: float | None) -> None:
    """A progress report of the attempt ``claim``: count the steps and tokens since the
    previous report and time the steps in between.

    Args:
        step: the job's step now (counting the earlier attempts' steps).
        trained_tokens: the job's tokens so far (the earlier attempts' included).
        tokens_per_second: the job's throughput as it reports it.
    """
    global _window
    m = training_metrics()
    now = time.monotonic()
    w = _window
    if w is None or (w.job_id, w.attempt) != (claim.job_id, claim.attempt):
        # A resumed attempt starts at its checkpoint's step; its token count there is not
        # known, so its tokens are counted from its first report on.
        start = claim.last_good_step or 0
        w = _Window(claim.job_id, claim.attempt, start, 0 if start == 0 else None, None)
    steps = max(step - w.step, 0)
    method = job_method(claim)
    m.steps.labels(method).inc(steps)
    if w.tokens is not None:
        m.tokens.labels(method).inc(max(trained_tokens - w.tokens, 0))
    if w.at is not None and steps:
        m.step_duration.labels(method).observe((now - w.at) / steps)
    if tokens_per_second is not None:
        m.tokens_per_second.set(tokens_per_second)
    _window = _Window(claim.job_id, claim.attempt, max(step, w.step), trained_tokens, now)


def training_idle() -> None:
    """This worker trains nothing now (a job ended, or a new pool process starts)."""
    training_metrics().tokens_per_second.set(0)


# --------------------------------------------------------------------------- serving
def enable(settings: Settings) -> bool:
    """Switch this process, and the pool processes it forks, to multiprocess metrics in a
    fresh folder (removed at exit), if ``worker_metrics_port`` is set. Call it in the main
    process before any metric is created; returns whether metrics are served.

    Raises:
        RuntimeError: metrics were created already; their values would not be served.
    """
    if settings.worker_metrics_port is None:
        return False
    if shared_metrics.job_metrics.cache_info().currsize or training_metrics.cache_info().currsize:
        raise RuntimeError("worker metrics were created before multiprocess mode was enabled")
    folder = tempfile.mkdtemp(prefix="lorafleet-metrics-")
    # prometheus_client reads its folder from this variable (in the pool processes too, which
    # inherit it); the values it creates from now on are file-backed.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()
    atexit.register(_remove, Path(folder), os.getpid())
    # Every series exists, at 0, from the first scrape.
    shared_metrics.job_metrics()
    training_idle()
    return True


def _remove(folder: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked pool process that runs atexit handlers
        shutil.rmtree(folder, ignore_errors=True)


def serve(settings: Settings) -> int:
    """Serve ``/metrics`` (any path, in fact) of this worker and its pool processes on
    ``worker_metrics_host``:``worker_metrics_port`` in a thread; returns the port."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    server, _thread = start_http_server(settings.worker_metrics_port or 0,
                                        settings.worker_metrics_host, registry=registry)
    port = int(server.server_port)
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, port)
    return port
