"""Liveness and readiness: the only endpoints that need no token."""

from __future__ import annotations

import redis
from flask import Blueprint, Response

from service.api import respond
from service.api.declare import documented
from service.extensions import services
from service.schemas import HealthOut, ReadyOut
from store.errors import DatabaseUnavailable

bp = Blueprint("health", __name__, url_prefix="/v1")


@bp.get("/health")
@documented("health", summary="Liveness", responses={200: HealthOut}, errors=(), auth=False)
def health() -> Response:
    """The process is up and serving requests."""
    return respond(HealthOut())


@bp.get("/ready")
@documented(
    "ready",
    summary="Readiness: the database and Redis answer",
    responses={200: ReadyOut, 503: (ReadyOut, "Something is unreachable")},
    errors=(),
    auth=False,
)
def ready() -> Response:
    """The database and Redis answer; 503 naming what failed otherwise."""
    checks: dict[str, str] = {}
    try:
        services().db.ping()
        checks["database"] = "ok"
    except DatabaseUnavailable as exc:
        checks["database"] = str(exc)[:300]
    client = redis.Redis.from_url(services().settings.redis_url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
        checks["redis"] = "ok"
    except (redis.RedisError, OSError) as exc:
        checks["redis"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        client.close()
    ok = all(value == "ok" for value in checks.values())
    return respond(ReadyOut(status="ready" if ok else "unavailable", checks=checks), 200 if ok else 503)
