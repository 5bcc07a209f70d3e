"""Webhook endpoints of a project, in the shapes of OpenAI's ``client.webhooks`` calls, and the
deliveries the outbox (``shared/outbox.py``) made to each."""

from __future__ import annotations

import base64
import secrets
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import outbox
from shared.errors import InvalidRequest, NotFound
from shared.ids import now, plausible_id
from shared.models import WebhookDelivery, WebhookEndpoint
from shared.schemas import Strict
from shared.settings import get_settings
from shared.webhook_targets import MAX_URL_LENGTH, check_url

KEEP_OLD_SECRET_SECONDS = 24 * 3600


# --------------------------------------------------------------------------- shapes
class WebhookEndpointCreate(Strict):
    url: str = Field(..., min_length=1, max_length=MAX_URL_LENGTH)
    event_types: list[str] | None = Field(
        None, min_length=1, max_length=len(outbox.EVENT_TYPES) * 4,
        description="Events to send. Default: all of them.")
    name: str = Field("", max_length=256)


class WebhookEndpointUpdate(Strict):
    url: str | None = Field(None, min_length=1, max_length=MAX_URL_LENGTH)
    event_types: list[str] | None = Field(None, min_length=1,
                                          max_length=len(outbox.EVENT_TYPES) * 4)
    name: str | None = Field(None, max_length=256)


class SecretRotation(Strict):
    keep_old_secret_active_for_24_hours: bool = False


class WebhookTest(Strict):
    event_type: str = Field(..., max_length=64)


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int
    event_types: list[str]
    name: str
    url: str
    signing_secret_hint: str


class WebhookEndpointWithSecret(WebhookEndpointPublic):
    signing_secret: str = Field(description="Shown only on creation and rotation.")


class WebhookEndpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    event_type: str
    status_code: int
    success: Literal[True] = True
    webhook_endpoint_id: str


class WebhookEventTypes(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class WebhookDeliveryPublic(BaseModel):
    id: str = Field(description="The event's id: the webhook-id header of every send.")
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    webhook_endpoint_id: str
    event_type: str
    fine_tuning_job_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(description="Sends so far.")
    next_attempt_at: int | None = Field(None, description="When a pending delivery is sent.")
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: int
    delivered_at: int | None = None
    payload: dict[str, Any]


class WebhookDeliveriesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def endpoint_public(row: WebhookEndpoint) -> WebhookEndpointPublic:
    return WebhookEndpointPublic(
        id=row.id, created_at=row.created_at, updated_at=row.updated_at,
        event_types=list(row.event_types), name=row.name, url=row.url,
        signing_secret_hint=f"whsec_****{row.secret[-4:]}")


def endpoint_with_secret(row: WebhookEndpoint) -> WebhookEndpointWithSecret:
    return WebhookEndpointWithSecret(**endpoint_public(row).model_dump(),
                                     signing_secret=row.secret)


def delivery_public(row: WebhookDelivery) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=row.event_id, webhook_endpoint_id=row.endpoint_id, event_type=row.type,
        fine_tuning_job_id=row.job_id, status=row.status,  # type: ignore[arg-type]
        attempts=row.attempts,
        next_attempt_at=int(row.next_attempt_at) if row.status == outbox.PENDING else None,
        last_status_code=row.last_status_code, last_error=row.last_error,
        created_at=row.created_at, delivered_at=row.delivered_at, payload=row.payload)


# --------------------------------------------------------------------------- checks
def _event_types(values: list[str] | None) -> list[str]:
    if values is None:
        return list(outbox.EVENT_TYPES)
    unknown = [v for v in values if v not in outbox.EVENT_TYPES]
    if unknown:
        raise InvalidRequest(f"event_types: unknown event type '{unknown[0][:64]}'; known: "
                             f"{', '.join(outbox.EVENT_TYPES)}", param="event_types")
    return list(dict.fromkeys(values))


def _check_url(url: str) -> str:
    check_url(url, allow_private=get_settings().webhook_allow_private_targets)
    return url


def _new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


# --------------------------------------------------------------------------- endpoints
def create_endpoint(session: Session, req: WebhookEndpointCreate, project: str) -> WebhookEndpoint:
    """Register an endpoint with a new signing secret.

    Raises:
        ForbiddenTarget: ``url`` is not ``http(s)`` or reaches a private address (400).
        InvalidRequest: an unknown event type (400).
    """
    types = _event_types(req.event_types)
    url = _check_url(req.url)
    t = now()
    row = WebhookEndpoint(id=f"whep_{secrets.token_hex(16)}", project=project, name=req.name,
                          url=url, event_types=types, secret=_new_secret(), created_at=t,
                          updated_at=t)
    session.add(row)
    session.flush()
    return row


def get_endpoint(session: Session, endpoint_id: str, project: str) -> WebhookEndpoint:
    """The project's endpoint; another project's is not found either."""
    row = (session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                        WebhookEndpoint.project == project))
           if plausible_id(endpoint_id) else None)
    if row is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id")
    return row


def list_endpoints(session: Session, project: str, after: str | None,
                   limit: int) -> tuple[list[WebhookEndpoint], bool]:
    """One page of the project's endpoints, newest first, and whether more follow."""
    query = (select(WebhookEndpoint).where(WebhookEndpoint.project == project)
             .order_by(WebhookEndpoint.seq.desc()))
    if after:
        query = query.where(WebhookEndpoint.seq < get_endpoint(session, after, project).seq)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def update_endpoint(session: Session, endpoint_id: str, req: WebhookEndpointUpdate,
                    project: str) -> WebhookEndpoint:
    """Change an endpoint's URL, events or name; deliveries already recorded keep going to
    the endpoint (at its new URL)."""
    row = get_endpoint(session, endpoint_id, project)
    changes: dict[str, Any] = {}
    if req.event_types is not None:
        changes["event_types"] = _event_types(req.event_types)
    if req.url is not None:
        changes["url"] = _check_url(req.url)
    if req.name is not None:
        changes["name"] = req.name
    changed = {k: v for k, v in changes.items() if getattr(row, k) != v}
    for key, value in changed.items():
        setattr(row, key, value)
    if changed:
        row.updated_at = now()
    session.flush()
    return row


def rotate_secret(session: Session, endpoint_id: str, req: SecretRotation,
                  project: str) -> WebhookEndpoint:
    """A new signing secret; with ``keep_old_secret_active_for_24_hours`` every send carries
    a signature with the old one too until then."""
    row = get_endpoint(session, endpoint_id, project)
    t = now()
    keep = req.keep_old_secret_active_for_24_hours
    row.previous_secret = row.secret if keep else None
    row.previous_secret_until = t + KEEP_OLD_SECRET_SECONDS if keep else None
    row.secret = _new_secret()
    row.updated_at = t
    session.flush()
    return row


def delete_endpoint(session: Session, endpoint_id: str, project: str) -> None:
    """Delete an endpoint and its deliveries (pending ones are not sent)."""
    row = get_endpoint(session, endpoint_id, project)
    session.delete(row)
    session.flush()


def send_test_event(session: Session, endpoint_id: str, req: WebhookTest,
                  project: str) -> WebhookTestResult:
    """Send one sample event now, signed like every other, and report the receiver's status.

    Raises:
        InvalidRequest: an unknown event type, a forbidden target, or no answer at all.
    """
    event_type = _event_types([req.event_type])[0]
    row = get_endpoint(session, endpoint_id, project)
    settings = get_settings()
    sample = {"fine_tuning.job.checkpoint.created": {"checkpoint_id": "ftckpt-test-1",
                                                     "step_number": 1}}.get(event_type)
    payload = outbox.event_payload(outbox.new_event_id(), event_type, "ftjob-test", sample)
    result = outbox.send(row.url, payload, outbox.signing_secrets(row, now()),
                         timeout=settings.webhook_timeout_seconds,
                         allow_private=settings.webhook_allow_private_targets)
    if result.status_code is None:
        raise InvalidRequest(f"the endpoint did not answer: {result.error}", param="url",
                             code="webhook_unreachable")
    return WebhookTestResult(event_type=event_type, status_code=result.status_code,
                             webhook_endpoint_id=row.id)


# --------------------------------------------------------------------------- deliveries
def list_deliveries(session: Session, endpoint_id: str, project: str, after: str | None,
                    limit: int, status: str | None = None) -> tuple[list[WebhookDelivery], bool]:
    """One page of an endpoint's deliveries, newest first; ``after`` is an event id."""
    get_endpoint(session, endpoint_id, project)
    query = (select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
             .order_by(WebhookDelivery.seq.desc()))
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if after:
        ref = (session.scalar(select(WebhookDelivery.seq).where(
            WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.event_id == after))
            if plausible_id(after) else None)
        if ref is None:
            raise NotFound(f"No such delivery: {after}", param="after")
        query = query.where(WebhookDelivery.seq < ref)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
