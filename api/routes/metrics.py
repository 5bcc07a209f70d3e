"""``GET /metrics``: Prometheus metrics of this API process and of the jobs (:mod:`api.metrics`).

No API key: Prometheus scrapes it. With ``LORAFLEET_METRICS_TOKEN`` set it needs that token
as a Bearer header instead, since it names the models of every project.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api import metrics

router = APIRouter(tags=["metrics"], include_in_schema=False)


@router.get("/metrics")
def get_metrics(request: Request) -> Response:
    """Prometheus' text format."""
    metrics.check_token(request.headers.get("authorization"))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
