"""GET /metrics: gpuyard's state and the API's latency in Prometheus' text format (service/metrics.py).

Who reads what:

* a scraper on this host (loopback) without a token: the aggregate series only, nothing labelled by job
  (job ids belong to users, and anyone with a shell on the host could read them);
* ``Authorization: Bearer <GPUYARD_METRICS_TOKEN>`` or an admin user's bearer token, from anywhere: also
  the per-job series (``gpuyard_job_samples_per_second{job}``);
* everyone else, and any bearer token that is neither: 403.
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
from service.principal import Principal, may_act

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
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if "Authorization" in request.headers:
        if scheme.lower() != "bearer" or not _is_privileged(given):
            raise Forbidden(
                "the bearer token is neither GPUYARD_METRICS_TOKEN nor an admin's token; scrapers on this host "
                "may also read the aggregate metrics without one"
            )
        per_job = True
    elif _is_loopback(request.remote_addr):
        per_job = False
    else:
        raise Forbidden(
            "metrics are served to this host's scrapers, or with 'Authorization: Bearer <GPUYARD_METRICS_TOKEN>'"
        )
    return Response(scrape(svc.db, svc.heartbeats, per_job=per_job), content_type=CONTENT_TYPE_LATEST)


def _is_privileged(token: str) -> bool:
    """Whether ``token`` is the metrics token or the token of an admin who may act."""
    svc = services()
    expected = svc.settings.metrics_token
    if token and expected and hmac.compare_digest(token, expected):
        return True
    user = svc.db.user_for_token(token) if token else None
    return user is not None and user.is_admin and may_act(user, Principal.of_token(user.id, token))


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
