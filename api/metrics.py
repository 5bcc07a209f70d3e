"""The API's Prometheus metrics, served at ``GET /metrics`` (:mod:`api.routes.metrics`).

* HTTP requests by route *template* (``/v1/fine_tuning/jobs/{job_id}``, never the raw path)
  and status, with latency histograms: :class:`RequestMetrics`, a pure ASGI middleware, so
  streamed answers pass through untouched and are timed to their last byte.
* Inference requests, tokens and latency per model (:func:`observe_inference`). The model
  label is the name a request asked for *after* it resolved to a model of the caller's
  project: unknown names (404) never become a label, so the label's values are bounded by the
  number of models.
* Jobs by status, queue depth and the age of the oldest queued job: read from the database at
  scrape time by :class:`JobsCollector` (one grouped query, cached for a couple of seconds), so
  they hold for the whole fleet whichever process changed the jobs.
* The lifecycle and webhook counters this process made (:mod:`shared.metrics`).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi.responses import Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Unauthorized
from shared import metrics as shared_metrics
from shared.db import get_engine
from shared.lifecycle import JobStatus
from shared.models import Job
from shared.settings import get_settings

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- HTTP
#: Methods with a label of their own; any other (a client may send anything) is "other".
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: The route label of a request no route handled: a 404, or a body refused before routing.
UNMATCHED = "unmatched"
# prometheus_client's defaults, and longer ones: a stream lasts as long as its generation.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                30.0, 60.0, 300.0)


class HttpRequests(Collector):
    """``lorafleet_http_requests_total{method, route, status}`` and
    ``lorafleet_http_request_duration_seconds{method, route}``, kept in plain Python numbers.

    Every request passes here, so the cost matters: ``prometheus_client``'s counters and
    histograms take a lock per increment (about 4 µs a request in all, 2% of a cached
    job-status GET); these lists cost a quarter of that. They need no lock because only the
    event loop's thread writes them; a scrape reads them from another thread, and takes each
    histogram's count from the same copy of its buckets, so the two always agree.
    """

    def __init__(self) -> None:
        # (method, route, status) -> [requests, [count per bucket, +Inf last], seconds]
        self._series: dict[tuple[str, str, str], list[Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in METHODS else "other", route, str(status))
        series = self._series.get(key)
        if series is None:
            series = self._series.setdefault(key, [0, [0] * (len(HTTP_BUCKETS) + 1), 0.0])
        series[0] += 1
        series[1][bisect.bisect_left(HTTP_BUCKETS, seconds)] += 1
        series[2] += seconds

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration = self._families()
        by_route: dict[tuple[str, str], tuple[list[int], float]] = {}
        for (method, route, status), (count, buckets, seconds) in list(self._series.items()):
            requests.add_metric([method, route, status], count)
            summed, total = by_route.get((method, route), ([0] * len(buckets), 0.0))
            by_route[(method, route)] = ([a + b for a, b in zip(summed, buckets, strict=True)],
                                         total + seconds)
        for labels, (buckets, seconds) in by_route.items():
            cumulative = list(itertools.accumulate(buckets))
            bounds = [floatToGoString(b) for b in HTTP_BUCKETS] + ["+Inf"]
            duration.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)),
                                seconds)
        return iter((requests, duration))

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (CounterMetricFamily("lorafleet_http_requests",
                                    "HTTP requests answered, by method, route template and "
                                    "status code.", labels=["method", "route", "status"]),
                HistogramMetricFamily("lorafleet_http_request_duration_seconds",
                                      "Time from a request's arrival to its answer's last "
                                      "byte, by method and route template.",
                                      labels=["method", "route"]))


HTTP = HttpRequests()
REGISTRY.register(HTTP)


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by route template and status
    (:class:`HttpRequests`).

    Outermost, so it also sees the answers of the other middlewares (413s). The route is read
    after the app ran: the router leaves the matched route in the request's scope.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the error middleware answers if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            HTTP.observe(scope["method"], route, status, time.perf_counter() - started)


# --------------------------------------------------------------------------- inference
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
INFERENCE_REQUESTS = Counter("lorafleet_inference_requests_total",
                             "Inference requests the engine answered, by model, endpoint and "
                             "status code.", ["model", "endpoint", "status"])
INFERENCE_TOKENS = Counter("lorafleet_inference_tokens_total",
                           "Tokens of inference requests, by model and type (prompt, "
                           "completion). A stream without usage counts one completion token "
                           "per chunk of text.", ["model", "type"])
INFERENCE_DURATION = Histogram("lorafleet_inference_request_duration_seconds",
                               "Time from forwarding an inference request to its answer's last "
                               "byte, by model and endpoint.", ["model", "endpoint"],
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
INFERENCE_FIRST_TOKEN = Histogram("lorafleet_inference_time_to_first_token_seconds",
                                  "Streams: time from forwarding a request to its first chunk "
                                  "of text, by model.", ["model"],
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def observe_inference(model: str, path: str, started: float, answer: Response) -> Response:
    """Count the engine's ``answer`` to a request for ``model`` forwarded at ``started``
    (``time.perf_counter()``); returns the answer (a stream is counted as it passes)."""
    endpoint = ENDPOINTS.get(path, "other")
    INFERENCE_REQUESTS.labels(model, endpoint, str(answer.status_code)).inc()
    if isinstance(answer, StreamingResponse):
        answer.body_iterator = _metered(answer.body_iterator, model, endpoint, started)
        return answer
    if answer.status_code == 200:
        with contextlib.suppress(ValueError, AttributeError):  # not a JSON object
            _count_usage(model, json.loads(bytes(answer.body)).get("usage"))
    INFERENCE_DURATION.labels(model, endpoint).observe(time.perf_counter() - started)
    return answer


def inference_unavailable(model: str, path: str, started: float) -> None:
    """The engine did not answer a request for ``model`` (the caller gets a 503)."""
    endpoint = ENDPOINTS.get(path, "other")
    INFERENCE_REQUESTS.labels(model, endpoint, "503").inc()
    INFERENCE_DURATION.labels(model, endpoint).observe(time.perf_counter() - started)


def _count_usage(model: str, usage: Any) -> bool:
    if not isinstance(usage, dict):
        return False
    for kind in ("prompt", "completion"):
        tokens = usage.get(f"{kind}_tokens")
        if isinstance(tokens, int) and tokens > 0:
            INFERENCE_TOKENS.labels(model, kind).inc(tokens)
    return True


def _text_chunks(event: dict[str, Any]) -> int:
    """How many choices of a stream chunk carry text (completion or chat delta)."""
    count = 0
    for choice in event.get("choices") or ():
        if isinstance(choice, dict) and (choice.get("text")
                                         or (choice.get("delta") or {}).get("content")):
            count += 1
    return count


async def _metered(body: AsyncIterable[Any], model: str, endpoint: str,
                   started: float) -> AsyncIterator[Any]:
    """Pass a server-sent event stream through unchanged, reading its events on the side:
    chunks of text, the usage chunk if the client asked for one, the first chunk's time."""
    pending, chunks, usage_seen, first = b"", 0, False, True
    try:
        async for piece in body:
            arrived = time.perf_counter()
            yield piece  # first: reading the events must not hold the text back
            pending += piece.encode() if isinstance(piece, str) else bytes(piece)
            *events, pending = pending.split(b"\n\n")
            for event in events:
                data = event.partition(b"data:")[2].strip()
                if not data or data == b"[DONE]":
                    continue
                try:
                    parsed = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(parsed, dict):
                    continue
                text = _text_chunks(parsed)
                if text and first:
                    first = False
                    INFERENCE_FIRST_TOKEN.labels(model).observe(arrived - started)
                chunks += text
                usage_seen = _count_usage(model, parsed.get("usage")) or usage_seen
    finally:
        if not usage_seen and chunks:
            INFERENCE_TOKENS.labels(model, "completion").inc(chunks)
        INFERENCE_DURATION.labels(model, endpoint).observe(time.perf_counter() - started)
        # A client that went away closes this stream: close the relay under it now (it stops
        # the engine's generation), not whenever it is collected.
        close = getattr(body, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


# --------------------------------------------------------------------------- jobs
#: How long one read of the jobs table answers scrapes: Prometheus servers in a pair, or a
#: person reloading, then cost one query.
JOBS_CACHE_SECONDS = 2.0


class JobsCollector(Collector):
    """``lorafleet_jobs{status}``, ``lorafleet_queue_depth`` and
    ``lorafleet_oldest_queued_job_age_seconds``, from one grouped query of the jobs table.

    Every API process reports the same fleet-wide values: aggregate them with ``max``, not
    ``sum``. A scrape while the database is away leaves these out (and logs why).
    """

    def __init__(self, clock: Callable[[], float] = time.time,
                 cache_seconds: float = JOBS_CACHE_SECONDS):
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._rows: dict[str, tuple[int, int | None]] = {}

    def clear(self) -> None:
        with self._lock:
            self._read_at = None

    def describe(self) -> Iterator[Metric]:
        # Names only: without this the registry would collect (query) when registering.
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        rows = self._read()
        if rows is None:
            return iter(())
        jobs, depth, oldest = self._families()
        for status in JobStatus:
            jobs.add_metric([status.value], rows.get(status.value, (0, None))[0])
        count, first = rows.get(JobStatus.QUEUED.value, (0, None))
        depth.add_metric([], count)
        oldest.add_metric([], max(self.clock() - first, 0.0) if first is not None else 0.0)
        return iter((jobs, depth, oldest))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("lorafleet_jobs", "Jobs by status, in the database.",
                                  labels=["status"]),
                GaugeMetricFamily("lorafleet_queue_depth",
                                  "Jobs waiting for a worker (status queued)."),
                GaugeMetricFamily("lorafleet_oldest_queued_job_age_seconds",
                                  "Age of the oldest queued job since its creation; 0 when "
                                  "none waits."))

    def _read(self) -> dict[str, tuple[int, int | None]] | None:
        with self._lock:
            now = self.clock()
            if self._read_at is not None and now - self._read_at < self.cache_seconds:
                return self._rows
            try:
                with get_engine().connect() as conn:
                    result = conn.execute(select(Job.status, func.count(), func.min(Job.created_at))
                                          .group_by(Job.status))
                    self._rows = {status: (count, first) for status, count, first in result}
            except Exception:  # noqa: BLE001 - the other metrics are still worth a scrape
                log.warning("metrics: could not read the jobs table", exc_info=True)
                return None
            self._read_at = now
            return self._rows


JOBS = JobsCollector()
REGISTRY.register(JOBS)
shared_metrics.job_metrics()  # the lifecycle series exist (at 0) from the first scrape


# --------------------------------------------------------------------------- exposition
def check_token(authorization: str | None) -> None:
    """With ``metrics_token`` set, ``/metrics`` needs ``Authorization: Bearer <token>``.

    Raises:
        Unauthorized: the token is set and the header does not carry it.
    """
    token = get_settings().metrics_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                token.encode()):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <LORAFLEET_METRICS_TOKEN>'")


def render() -> tuple[bytes, str]:
    """This process's metrics in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
