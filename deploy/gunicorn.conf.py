"""gunicorn settings for the API in a container: ``gunicorn -c deploy/gunicorn.conf.py "service.app:create_app()"``.

gthread, because a job's SSE stream (``/v1/jobs/<id>/events``) holds one thread for as long as the client
follows it: ``workers × threads`` is how many requests and live streams one container serves at once.
With gthread, ``timeout`` watches the worker's heartbeat, which the main thread keeps beating while
streams run, so it never cuts a long stream; it only restarts a worker whose main loop is stuck.
"""

from __future__ import annotations

import os

# Inside the container; compose publishes the port, a TLS proxy sits in front (docs/deploy.md).
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "16"))

# Seconds without a heartbeat before the arbiter kills a worker (not a request-length limit in gthread).
timeout = 120
# On SIGTERM: how long running requests get; an SSE client reconnects to another worker.
graceful_timeout = 30
# Longer than the reverse proxy's upstream keep-alive, so the proxy closes idle connections first.
keepalive = 75
# Never recycle workers by request count: that would cut every SSE stream the worker holds.
max_requests = 0
# The heartbeat file on tmpfs: a container's overlay file system can stall it under disk pressure.
worker_tmp_dir = "/dev/shm"
# Each worker builds its own app (and DB pool) after the fork; migrations take a lock, so all may start.
preload_app = False

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
