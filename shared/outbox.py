"""Webhook events through an outbox in the database.

:func:`record` writes one delivery row per subscribed endpoint in the transaction of the change
the event reports (``shared.lifecycle`` calls it), so an event exists if and only if the change
was committed. Dispatchers (a :class:`Dispatcher` thread in the API and in every worker) send
the rows that are due, signed the Standard Webhooks way so that OpenAI's SDK verifies them
(``client.webhooks.unwrap``). Because the rows are the truth, a process that stops loses
nothing: whichever dispatcher runs next sends what is left.

Delivery is at least once. A dispatcher *claims* a row before sending (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, and on both backends a conditional update that bumps ``attempts``, the
row's fencing token), which also holds it for a lease longer than a send can take: two
dispatchers never send the same row at once. A sender that dies mid-send leaves the row to be
claimed again once its lease runs out, so a receiver may see an event twice; every send of an
event carries the same ``webhook-id`` (the event's ``evt_…`` id) for it to drop duplicates.

A send that is not answered 2xx in ``webhook_timeout_seconds`` is retried after
``webhook_backoff_seconds``, doubling each time (at most ``webhook_max_backoff_seconds``),
until ``webhook_max_attempts`` sends; then the delivery is ``failed``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from shared import metrics
from shared.db import execute_count, session_scope
from shared.dependencies import log_failure
from shared.ids import now
from shared.models import Job, WebhookDelivery, WebhookEndpoint
from shared.settings import get_settings
from shared.webhook_targets import ForbiddenTarget, parse_url, resolve

log = logging.getLogger(__name__)

#: The events a project can subscribe to: OpenAI's three, then lorafleet's two.
EVENT_TYPES = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.paused",
    "fine_tuning.job.checkpoint.created",
)
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
USER_AGENT = "lorafleet-webhooks/1"
_ERROR_CHARS = 500  # of a receiver's answer kept in ``last_error``


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(16)}"


def event_payload(event_id: str, event: str, job_id: str,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event as OpenAI sends it: ``{"id", "object": "event", "created_at", "type",
    "data": {"id": <job id>, …}}``."""
    return {"id": event_id, "object": "event", "created_at": now(), "type": event,
            "data": {"id": job_id, **(data or {})}}


def record(session: Session, job_id: str, event: str, data: dict[str, Any] | None = None) -> None:
    """Record webhook ``event`` (``fine_tuning.job.succeeded``, …) about ``job_id`` in
    ``session``'s transaction, for delivery to the project's endpoints that subscribe to it.

    Args:
        data: fields of the event's ``data`` beside the job's ``id`` (``checkpoint_id``, …).
    """
    project = session.scalar(select(Job.project).where(Job.id == job_id))
    if project is None:
        return
    endpoints = [endpoint_id for endpoint_id, types in session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.event_types)
        .where(WebhookEndpoint.project == project).order_by(WebhookEndpoint.seq))
        if event in types]
    if not endpoints:
        return
    event_id = new_event_id()
    payload = event_payload(event_id, event, job_id, data)
    due = time.time()
    for endpoint_id in endpoints:
        session.add(WebhookDelivery(
            event_id=event_id, endpoint_id=endpoint_id, job_id=job_id, type=event,
            payload=payload, status=PENDING, attempts=0, next_attempt_at=due,
            created_at=payload["created_at"]))


# --------------------------------------------------------------------------- signing
def backoff_seconds(failed_sends: int, base: float, cap: float) -> float:
    """The wait after the ``failed_sends``-th failed send: ``base``, ``2·base``, ``4·base``, …
    and never more than ``cap``."""
    return min(cap, base * 2.0 ** min(max(failed_sends - 1, 0), 64))


def signing_secrets(endpoint: WebhookEndpoint, at: int) -> list[str]:
    """The endpoint's secret, and its previous one while a rotation keeps it valid."""
    keys = [endpoint.secret]
    if endpoint.previous_secret and (endpoint.previous_secret_until or 0) > at:
        keys.append(endpoint.previous_secret)
    return keys


def signed_headers(keys: list[str], event_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one send: ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, one per key,
    space separated; a receiver accepts any that matches)."""
    at = datetime.fromtimestamp(timestamp, tz=UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(Webhook(k).sign(event_id, at, body) for k in keys),
    }


# --------------------------------------------------------------------------- sending
@dataclass(frozen=True)
class SendResult:
    status_code: int | None  # ``None``: no answer (refused, timed out, not resolved)
    error: str | None = None
    permanent: bool = False  # retrying cannot help (a forbidden target)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(url: str, payload: dict[str, Any], keys: list[str], *, timeout: float,
         allow_private: bool) -> SendResult:
    """POST ``payload`` to ``url``, signed with ``keys``; never raises.

    The host is resolved and checked here (:mod:`shared.webhook_targets`) and the request goes
    to a checked address, with the URL's host in ``Host`` and in TLS's server name.
    """
    try:
        parts = parse_url(url)
        addresses = resolve(parts, allow_private=allow_private)
    except ForbiddenTarget as e:
        return SendResult(None, e.message, permanent=True)
    except OSError as e:
        return SendResult(None, f"cannot resolve {parts.hostname}: {e}")
    body = json.dumps(payload, separators=(",", ":"))
    headers = {"content-type": "application/json", "user-agent": USER_AGENT,
               **signed_headers(keys, str(payload["id"]), int(time.time()), body)}
    target = httpx.URL(url)
    headers["host"] = target.netloc.decode("ascii").rpartition("@")[2]
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    error = "no address to connect to"
    # trust_env off: a proxy would resolve the name again, after the check.
    with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        for address in addresses:
            try:
                with client.stream("POST", target.copy_with(host=address), content=body,
                                   headers=headers, extensions=extensions) as answer:
                    if 200 <= answer.status_code < 300:
                        return SendResult(answer.status_code)
                    text = _head(answer).decode("utf-8", "replace")
                    return SendResult(answer.status_code, f"HTTP {answer.status_code}: {text}")
            except httpx.ConnectError as e:  # the next address may answer
                error = f"cannot connect to {address}: {e}"
            except httpx.HTTPError as e:
                return SendResult(None, f"{type(e).__name__}: {e}"[:_ERROR_CHARS])
    return SendResult(None, error[:_ERROR_CHARS])


def _head(answer: httpx.Response) -> bytes:
    got = b""
    for chunk in answer.iter_bytes():
        got += chunk
        if len(got) >= _ERROR_CHARS:
            break
    return got[:_ERROR_CHARS]


# --------------------------------------------------------------------------- claiming
@dataclass(frozen=True)
class Claimed:
    """A delivery this dispatcher holds: ``attempts`` (this send's number) fences its write."""

    seq: int
    attempts: int
    event_id: str
    payload: dict[str, Any]
    url: str
    keys: list[str]


def claim_next(at: float | None = None) -> Claimed | None:
    """Claim the delivery that has been due longest (``None``: none is due).

    The claim bumps ``attempts`` and moves ``next_attempt_at`` past the longest a send can
    take, so no other dispatcher takes the row meanwhile. A row already sent
    ``webhook_max_attempts`` times whose last sender vanished before writing the answer is
    marked ``failed`` instead.
    """
    settings = get_settings()
    t = time.time() if at is None else at
    lease = 3 * settings.webhook_timeout_seconds + 5
    with session_scope() as s:
        for _ in range(20):  # on SQLite another dispatcher may take the row between the two
            row = s.execute(
                select(WebhookDelivery.seq, WebhookDelivery.attempts, WebhookDelivery.event_id,
                       WebhookDelivery.payload, WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= t)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.seq)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            if row.attempts >= settings.webhook_max_attempts:
                _fenced_write(s, row.seq, row.attempts, {
                    "status": FAILED,
                    "last_error": "the last send's answer was never recorded (its sender "
                                  "stopped)"})
                continue
            if not _fenced_write(s, row.seq, row.attempts, {"attempts": row.attempts + 1,
                                                             "next_attempt_at": t + lease}):
                continue
            endpoint = s.scalar(select(WebhookEndpoint)
                                .where(WebhookEndpoint.id == row.endpoint_id))
            if endpoint is None:  # deleted meanwhile; its deliveries go with it
                continue
            return Claimed(row.seq, row.attempts + 1, row.event_id, dict(row.payload),
                           endpoint.url, signing_secrets(endpoint, int(t)))
    return None


def settle(claimed: Claimed, result: SendResult) -> str:
    """Write a send's outcome; returns the delivery's status (``pending``: retried later).
    A write that matches no row changes nothing: the endpoint was deleted, or this send
    outlived its lease and another dispatcher holds the row now."""
    settings = get_settings()
    values: dict[str, Any] = {"last_status_code": result.status_code,
                              "last_error": result.error}
    if result.ok:
        values.update(status=DELIVERED, delivered_at=now())
    elif result.permanent or claimed.attempts >= settings.webhook_max_attempts:
        values.update(status=FAILED)
    else:
        values.update(status=PENDING, next_attempt_at=time.time() + backoff_seconds(
            claimed.attempts, settings.webhook_backoff_seconds,
            settings.webhook_max_backoff_seconds))
    with session_scope() as s:
        _fenced_write(s, claimed.seq, claimed.attempts, values)
    return str(values["status"])


def _fenced_write(session: Session, seq: int, attempts: int, values: dict[str, Any]) -> bool:
    """Update a pending delivery if its ``attempts`` is still the one read (or claimed)."""
    return execute_count(session, update(WebhookDelivery).where(
        WebhookDelivery.seq == seq, WebhookDelivery.status == PENDING,
        WebhookDelivery.attempts == attempts).values(**values)) == 1


def deliver_due(halt: threading.Event | None = None, limit: int = 100) -> int:
    """Send due deliveries, one claim at a time, until none is due, ``halt`` is set, or
    ``limit`` sends; returns how many were sent."""
    settings = get_settings()
    sent = 0
    while sent < limit and not (halt and halt.is_set()):
        claimed = claim_next()
        if claimed is None:
            break
        result = send(claimed.url, claimed.payload, claimed.keys,
                      timeout=settings.webhook_timeout_seconds,
                      allow_private=settings.webhook_allow_private_targets)
        status = settle(claimed, result)
        sent += 1
        metrics.webhook_sent("retry" if status == PENDING else status)
        if status == FAILED:
            log.warning("webhook %s to %s failed after %d sends: %s", claimed.event_id,
                        claimed.url, claimed.attempts, result.error)
        elif status == PENDING:
            log.info("webhook %s to %s: send %d failed (%s); retrying", claimed.event_id,
                     claimed.url, claimed.attempts, result.error)
    return sent


class Dispatcher(threading.Thread):
    """Sends due webhook deliveries every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float):
        super().__init__(name="lorafleet-webhooks", daemon=True)
        self.interval = interval
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                deliver_due(self.halt)
            except Exception as e:  # database briefly away: the rows wait for the next round
                log_failure(log, "webhook delivery pass failed", e)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the send in flight (its row is claimed again if this one is cut off)."""
        self.halt.set()
        self.join(timeout)
