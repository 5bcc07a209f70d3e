"""Webhook endpoints (OpenAI's ``client.webhooks`` calls) and their deliveries."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api import webhooks
from api.deps import ProjectDep, SessionDep
from api.webhooks import (
    SecretRotation,
    WebhookDeliveriesPublic,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointPublic,
    WebhookEndpointsPublic,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookEventTypes,
    WebhookTest,
    WebhookTestResult,
    delivery_public,
    endpoint_public,
    endpoint_with_secret,
)
from shared.outbox import EVENT_TYPES

router = APIRouter(prefix="/v1", tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]
ENDPOINT = "/webhook_endpoints/{webhook_endpoint_id}"


@router.post("/webhook_endpoints", response_model=WebhookEndpointWithSecret)
def create_endpoint(body: WebhookEndpointCreate, session: SessionDep,
                    project: ProjectDep) -> WebhookEndpointWithSecret:
    """Register a webhook endpoint; its signing secret is shown this once."""
    return endpoint_with_secret(webhooks.create_endpoint(session, body, project))


@router.get("/webhook_endpoints", response_model=WebhookEndpointsPublic)
def list_endpoints(session: SessionDep, project: ProjectDep, after: str | None = None,
                   limit: Limit = 20) -> WebhookEndpointsPublic:
    """List the project's webhook endpoints, newest first."""
    rows, more = webhooks.list_endpoints(session, project, after, limit)
    return WebhookEndpointsPublic(data=[endpoint_public(r) for r in rows], has_more=more,
                                  first_id=rows[0].id if rows else None,
                                  last_id=rows[-1].id if rows else None)


@router.get(ENDPOINT, response_model=WebhookEndpointPublic)
def retrieve_endpoint(webhook_endpoint_id: str, session: SessionDep,
                      project: ProjectDep) -> WebhookEndpointPublic:
    """Retrieve a webhook endpoint (without its secret)."""
    return endpoint_public(webhooks.get_endpoint(session, webhook_endpoint_id, project))


@router.post(ENDPOINT, response_model=WebhookEndpointPublic)
def update_endpoint(webhook_endpoint_id: str, body: WebhookEndpointUpdate,
                    session: SessionDep, project: ProjectDep) -> WebhookEndpointPublic:
    """Change a webhook endpoint's URL, event types or name."""
    return endpoint_public(webhooks.update_endpoint(session, webhook_endpoint_id, body,
                                                    project))


@router.delete(ENDPOINT, response_model=WebhookEndpointDeleted)
def delete_endpoint(webhook_endpoint_id: str, session: SessionDep,
                    project: ProjectDep) -> WebhookEndpointDeleted:
    """Delete a webhook endpoint; its pending deliveries are dropped."""
    webhooks.delete_endpoint(session, webhook_endpoint_id, project)
    return WebhookEndpointDeleted(id=webhook_endpoint_id)


@router.post(f"{ENDPOINT}/rotate_secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(webhook_endpoint_id: str, session: SessionDep, project: ProjectDep,
                  body: SecretRotation | None = None) -> WebhookEndpointWithSecret:
    """Replace the signing secret; the new one is shown this once."""
    row = webhooks.rotate_secret(session, webhook_endpoint_id, body or SecretRotation(),
                                 project)
    return endpoint_with_secret(row)


@router.post(f"{ENDPOINT}/test", response_model=WebhookTestResult)
def send_test_event(webhook_endpoint_id: str, body: WebhookTest, session: SessionDep,
                  project: ProjectDep) -> WebhookTestResult:
    """Send a sample event now and report the receiver's HTTP status."""
    return webhooks.send_test_event(session, webhook_endpoint_id, body, project)


@router.get(f"{ENDPOINT}/deliveries", response_model=WebhookDeliveriesPublic)
def list_deliveries(webhook_endpoint_id: str, session: SessionDep, project: ProjectDep,
                    after: str | None = None, limit: Limit = 20,
                    status: Literal["pending", "delivered", "failed"] | None = None,
                    ) -> WebhookDeliveriesPublic:
    """The endpoint's deliveries, newest first: status, sends so far, the last answer."""
    rows, more = webhooks.list_deliveries(session, webhook_endpoint_id, project, after, limit,
                                          status)
    return WebhookDeliveriesPublic(data=[delivery_public(r) for r in rows], has_more=more,
                                   first_id=rows[0].event_id if rows else None,
                                   last_id=rows[-1].event_id if rows else None)


@router.get("/webhook_event_types", response_model=WebhookEventTypes)
def list_event_types(project: ProjectDep) -> WebhookEventTypes:
    """The event types an endpoint can subscribe to."""
    return WebhookEventTypes(data=list(EVENT_TYPES))
