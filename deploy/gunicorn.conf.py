"""gunicorn settings for the API in a container: ``gunicorn -c deploy/gunicorn.conf.py "service.app:create_app()"``.

The serving settings (gevent workers, connections, timeouts) are the ones ``gpuyard api`` uses, from
``service/gunicorn_conf.py``; this file adds what differs in a container (bind, keep-alive behind a
proxy, logs, the heartbeat directory).
"""

from __future__ import annotations

import os

from service.gunicorn_conf import (  # noqa: F401  (gunicorn reads these names from this module)
    graceful_timeout,
    limit_request_field_size,
    limit_request_fields,
    limit_request_line,
    max_requests,
    preload_app,
    timeout,
    worker_class,
    worker_connections,
    workers,
)

# Inside the container; compose publishes the port, a TLS proxy sits in front (docs/deploy.md).
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# Longer than the reverse proxy's upstream keep-alive, so the proxy closes idle connections first (the
# proxy, not gunicorn, then bounds slow clients' headers).
keepalive = 75
# The heartbeat file on tmpfs: a container's overlay file system can stall it under disk pressure.
worker_tmp_dir = "/dev/shm"

# Logs to stdout/stderr, where `docker compose logs` reads them.
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss "%(a)s"'
# X-Forwarded-* are trusted only from FORWARDED_ALLOW_IPS, which gunicorn reads itself (docs/deploy.md).
