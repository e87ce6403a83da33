"""GET /metrics: gpuyard's state and the API's latency in Prometheus' text format (service/metrics.py).

Open to scrapers on this host (loopback) and, from elsewhere, to those sending
``Authorization: Bearer <GPUYARD_METRICS_TOKEN>``; everyone else gets 403.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.declare import TEXT, documented
from service.errors import Forbidden
from service.extensions import services
from service.metrics import scrape

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@documented(
    "metrics",
    summary="Prometheus metrics (text format): jobs by state, queue, waits, durations, GPUs, API latency; "
    "loopback scrapers, or Bearer GPUYARD_METRICS_TOKEN",
    responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": TEXT}}},
    errors=(403,),
    auth=False,
)
def metrics() -> Response:
    """The metrics, in Prometheus' text exposition format."""
    svc = services()
    token = svc.settings.metrics_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    by_token = bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
    if not (by_token or _is_loopback(request.remote_addr)):
        raise Forbidden(
            "metrics are served to this host's scrapers, or with 'Authorization: Bearer <GPUYARD_METRICS_TOKEN>'"
        )
    return Response(scrape(svc.db, svc.heartbeats), content_type=CONTENT_TYPE_LATEST)


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
