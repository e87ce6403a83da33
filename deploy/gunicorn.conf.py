"""gunicorn settings for the API in a container: ``gunicorn -c deploy/gunicorn.conf.py "service.app:create_app()"``.

The serving settings (gevent workers, connections, timeouts) are the ones ``gpuyard api`` uses, from
``service/gunicorn_conf.py``; this file adds what differs in a container (bind, keep-alive behind a
proxy, logs, the heartbeat directory).
"""

from __future__ import annotations

import os

from service.gunicorn_conf import (  # noqa: F401  (gunicorn reads these names from this module)
    graceful_timeout,
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

# Header limits: set above the app's own (service/app.py MAX_HEADER_FIELD_BYTES 8190 per field, 32 KiB in
# all, 100 fields), so a client meets the app's JSON 431 rather than gunicorn's HTML 400/431. What still
# gets gunicorn's own plain answer, before the app runs: a request line over 8190 bytes (gunicorn's
# ceiling), one header field over 64 KiB, more than 1000 fields, and requests that are not HTTP at all.
limit_request_line = 8190
limit_request_field_size = 64 * 1024
limit_request_fields = 1000
