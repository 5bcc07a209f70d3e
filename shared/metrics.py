"""Prometheus metrics of the job lifecycle and of webhook sends, counted where they happen.

A transition of :mod:`shared.lifecycle` runs in whichever process makes it: a worker's pool
process claims, releases and finishes jobs, a worker's sweeper takes jobs from silent workers,
the API cancels idle ones. Each process counts the transitions it makes and exposes them on its
own ``/metrics`` (the API's, or the worker's, see :mod:`worker.metrics`); Prometheus adds the
processes up (``sum(rate(...))``). Counting at the transition, rather than deriving counts from
the database at scrape time, gives exact rates that survive the deletion of rows, with no
query per scrape and no double counting when several API processes are scraped.

The metric objects are created on first use, not at import: a worker switches
``prometheus_client`` to its multiprocess mode before that (its pool process counts too).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Histogram

#: Why a running job went back to ``queued``.
REQUEUE_REASONS = ("preempted", "failure", "lease_lost")
#: What became of one webhook send: the receiver took it, it is sent again later, or never.
WEBHOOK_OUTCOMES = ("delivered", "retry", "failed")
#: The final statuses a job's duration is observed with.
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
# From a minute to a day: jobs are minutes to hours long, queue waits included.
JOB_DURATION_BUCKETS = (60, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600,
                        24 * 3600, 48 * 3600)


@dataclass(frozen=True)
class JobMetrics:
    attempts: Counter
    requeues: Counter
    preemptions: Counter
    lease_losses: Counter
    duration: Histogram
    webhook_sends: Counter


@cache
def job_metrics() -> JobMetrics:
    """This process's lifecycle and webhook metrics (created, and registered, on first call).
    Every label value is declared up front, so each series exists (at 0) from the start."""
    m = JobMetrics(
        attempts=Counter("lorafleet_job_attempts_total",
                         "Attempts started: a worker claimed a queued job."),
        requeues=Counter("lorafleet_job_requeues_total",
                         "Running jobs sent back to the queue, by reason (preempted: the "
                         "worker shut down; failure: the attempt failed; lease_lost: its "
                         "worker went silent and the sweeper took the job).", ["reason"]),
        preemptions=Counter("lorafleet_job_preemptions_total",
                            "Running jobs given back by a worker that was shutting down, after "
                            "a checkpoint."),
        lease_losses=Counter("lorafleet_job_lease_losses_total",
                             "Attempts whose heartbeat expired: the sweeper took their job."),
        duration=Histogram("lorafleet_job_duration_seconds",
                           "Time from a job's creation to its final status, queueing "
                           "included.", ["status"], buckets=JOB_DURATION_BUCKETS),
        webhook_sends=Counter("lorafleet_webhook_sends_total",
                              "Webhook sends by outcome (delivered: answered 2xx; retry: sent "
                              "again later; failed: given up).", ["outcome"]),
    )
    for reason in REQUEUE_REASONS:
        m.requeues.labels(reason)
    for status in FINAL_STATUSES:
        m.duration.labels(status)
    for outcome in WEBHOOK_OUTCOMES:
        m.webhook_sends.labels(outcome)
    return m


def attempt_started() -> None:
    job_metrics().attempts.inc()


def requeued(reason: str) -> None:
    """A running job went back to the queue; ``reason`` is one of :data:`REQUEUE_REASONS`."""
    job_metrics().requeues.labels(reason).inc()


def preempted() -> None:
    job_metrics().preemptions.inc()


def lease_lost() -> None:
    job_metrics().lease_losses.inc()


def job_finished(status: str, seconds: float) -> None:
    """A job reached final ``status`` ``seconds`` after it was created."""
    job_metrics().duration.labels(status).observe(max(seconds, 0.0))


def webhook_sent(outcome: str) -> None:
    """One webhook send ended; ``outcome`` is one of :data:`WEBHOOK_OUTCOMES`."""
    job_metrics().webhook_sends.labels(outcome).inc()
