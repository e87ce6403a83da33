"""gunicorn settings for the API, used by ``gpuyard api``/``gpuyard up`` (``-c python:service.gunicorn_conf``)
and by the container (``deploy/gunicorn.conf.py`` imports them).

gevent workers, because an event stream (``GET /v1/jobs/<id>/events``) lasts as long as its job: with a
greenlet per connection an idle stream costs a few kilobytes, not a request thread (with ``gthread``, 20
idle streams held all 16 threads and ``/v1/health`` stopped answering). ``keepalive`` also bounds how long
a connection may take to send its request headers (gunicorn's async workers read them under a
``gevent.Timeout`` of ``keepalive`` seconds), so slow-header clients cannot pile up either.
"""

from __future__ import annotations

import os

worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Connections (requests + open streams) one worker serves at once; past it, new ones wait in the backlog.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
# Seconds a connection may take to send its headers, and an idle keep-alive connection stays open.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# Seconds without a heartbeat before the arbiter kills a worker (a stuck event loop, not a long request).
timeout = 120
# On SIGTERM: how long running requests get; an SSE client reconnects to another worker.
graceful_timeout = 30
# Never recycle workers by request count: that would cut every stream the worker holds.
max_requests = 0
# Each worker builds its own app (and DB pool) after the fork; migrations take a lock, so all may start.
preload_app = False
# Header limits: set above the app's own (service/app.py MAX_HEADER_FIELD_BYTES 8190 per field, 32 KiB in
# all, 100 fields), so a client meets the app's JSON 431 rather than gunicorn's HTML 400/431. What still
# gets gunicorn's own plain answer, before the app runs: a request line over 8190 bytes (gunicorn's
# ceiling), one header field over 64 KiB, more than 1000 fields, and requests that are not HTTP at all.
limit_request_line = 8190
limit_request_field_size = 64 * 1024
limit_request_fields = 1000
