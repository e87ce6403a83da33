"""Container health checks: ``python deploy/healthcheck.py api|worker|janitor`` exits 0 when healthy.

api      GET /v1/health on the local gunicorn answers 200 (on GUNICORN_BIND's port, as deploy/gunicorn.conf.py binds).
worker   a Celery node of this container answers a ping over the broker (it does while its trainers run):
         any node named ``…@<hostname>``, since ``gpuyard worker`` names its nodes ``gpu<index>@<host>``
         (one per GPU) and ``<GPUYARD_TRAIN_QUEUE>@<host>`` (the CPU worker), and a container's hostname
         is its own.
janitor  the job database and Redis, the two things a janitor pass needs, answer.

Each check imports only what it needs, inside the function: the API's check runs every 30 s and should
not pay for importing Celery.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from collections.abc import Iterable

API_HEALTH_PATH = "/v1/health"


def api_health_url(bind: str | None = None) -> str:
    """The health URL of the API bound at ``bind`` (``host:port``, default GUNICORN_BIND or 0.0.0.0:8000),
    asked on loopback."""
    bind = bind or os.environ.get("GUNICORN_BIND") or "0.0.0.0:8000"
    port = bind.rpartition(":")[2] or "8000"
    return f"http://127.0.0.1:{port}{API_HEALTH_PATH}"


def check_api(url: str | None = None, timeout_s: float = 5.0) -> str | None:
    """None when the API answers 200, else what went wrong."""
    url = url or api_health_url()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        return f"{url}: {exc}"


def local_nodes(replies: Iterable[dict[str, object]], hostname: str | None = None) -> list[str]:
    """The nodes among ping ``replies`` (``[{node: {"ok": "pong"}}, …]``) that run on ``hostname``:
    named ``<anything>@<hostname>``, as every node ``gpuyard worker`` starts is."""
    suffix = f"@{hostname or socket.gethostname()}"
    return sorted(node for reply in replies for node in reply if node.endswith(suffix) and node != suffix)


def check_worker(timeout_s: float = 5.0) -> str | None:
    """None when a Celery worker of this host (container) answers a ping, else what went wrong."""
    from core.settings import get_settings
    from worker.celery_app import make_celery

    settings = get_settings()
    hostname = socket.gethostname()
    try:
        # A broadcast: every node answers, each under its own name; ours end in @<hostname>.
        replies = make_celery(settings).control.ping(timeout=timeout_s)
    except Exception as exc:  # kombu's connection errors have no common base worth naming here
        return f"cannot reach the broker (GPUYARD_REDIS_URL): {type(exc).__name__}: {exc}"
    if not local_nodes(replies, hostname):
        others = sorted(node for reply in replies for node in reply)
        return f"no worker named …@{hostname} answered a ping within {timeout_s:g}s (answered: {others or 'none'})"
    return None


def check_janitor(timeout_s: float = 5.0) -> str | None:
    """None when the job database and Redis answer, else what went wrong."""
    import redis

    from core.settings import get_settings
    from store import Database
    from store.errors import DatabaseUnavailable

    settings = get_settings()
    db = Database(settings.database_url)
    try:
        db.ping()
    except DatabaseUnavailable as exc:
        return f"job database: {exc}"
    finally:
        db.dispose()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"redis (GPUYARD_REDIS_URL): {type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


CHECKS = {"api": check_api, "worker": check_worker, "janitor": check_janitor}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in CHECKS:
        print(f"usage: healthcheck.py {'|'.join(CHECKS)}. Received: {args}", file=sys.stderr)
        return 2
    problem = CHECKS[args[0]]()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
