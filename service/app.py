"""The Flask application factory: ``gunicorn "service.app:create_app()"``."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from core.errors import GpuyardError
from core.hostmem import trainer_memory_limit
from core.settings import Settings, get_settings
from service.api import datasets, gpus, health, jobs, metrics, openapi, operations, studies, usage, users
from service.checks import DryRunGate, sandbox_check_dataset, trainer_dry_run
from service.errors import HeadersTooLarge, scrub_paths, server_roots, to_api_error
from service.extensions import EXTENSION_KEY, Services, csrf, init_services
from service.metrics import observe_requests
from service.sessions import init_sessions
from service.streams import EventHub, StreamSlots
from service.ui import bp as ui_bp
from service.ui import root as ui_root
from store import Database
from worker.heartbeat import GpuBoard
from worker.queues import OPERATE_TASK, celery_sender
from worker.relay import EventPublisher
from worker.storage import LocalStorage

DEFAULT_CONFIG: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # JSON bodies; the upload endpoint raises its own limit
    "MAX_FORM_MEMORY_SIZE": 64 * 1024,  # non-file multipart fields
    "MAX_FORM_PARTS": 16,
    # Components tests may replace: GPUYARD_SETTINGS (Settings), GPUYARD_JOB_QUEUE and GPUYARD_OPERATION_QUEUE
    # (worker.queues.Sender's of gpuyard.train and gpuyard.operate),
    # GPUYARD_DATASET_CHECKER, GPUYARD_DRY_RUNNER, GPUYARD_GPU_HEARTBEATS (see service.extensions),
    # GPUYARD_DB_SCHEMA (PostgreSQL).
    # Create an empty job DB at the schema's head, refuse one that is behind (store/migrations.py).
    "GPUYARD_ENSURE_SCHEMA": True,
}

# Request header limits the app answers with JSON 431 (gunicorn's own limits are set higher).
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_FIELDS = 100

# werkzeug's exception names as our error codes ("Request Entity Too Large" reads oddly in JSON).
_HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the API app: configuration, then services, blueprints and error handlers.

    Args:
        test_config: Flask config overriding the defaults (and the components, for tests).
    """
    app = Flask(__name__)
    # No redirects: werkzeug answers "//" in a path (an id that starts with "/") with a 308 it renders
    # itself, in HTML, before any error handler runs. Unmerged, such a path is simply not found (JSON 404).
    app.url_map.merge_slashes = False
    app.config.from_mapping(DEFAULT_CONFIG)
    if test_config is not None:
        app.config.from_mapping(test_config)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_request_checks(app)
    observe_requests(app)
    return app


def register_extensions(app: Flask) -> None:
    """Open the job DB (refusing a schema behind), storage, the job queue and the out-of-process checkers; sessions."""
    settings: Settings = app.config.get("GPUYARD_SETTINGS") or get_settings()
    init_sessions(app, settings)
    csrf.init_app(app)
    db = Database(settings.database_url, schema=app.config.get("GPUYARD_DB_SCHEMA"))
    if app.config["GPUYARD_ENSURE_SCHEMA"]:
        db.ensure_schema()  # SchemaBehind: the process exits, naming `gpuyard db upgrade`
    assert settings.storage_dir is not None  # filled in by Settings
    storage = LocalStorage(settings.storage_dir)
    swept = storage.sweep_tmp(settings.tmp_max_age_s)  # what uploads killed mid-way left behind
    if swept:
        app.logger.info("removed %d stale upload staging file(s) from storage tmp/", swept)
    init_services(
        app,
        Services(
            settings=settings,
            db=db,
            storage=storage,
            send=app.config.get("GPUYARD_JOB_QUEUE") or celery_sender(settings),
            check_dataset=app.config.get("GPUYARD_DATASET_CHECKER")
            or functools.partial(sandbox_check_dataset, settings=settings),
            dry_run=DryRunGate(
                app.config.get("GPUYARD_DRY_RUNNER")
                or functools.partial(
                    trainer_dry_run,
                    timeout_s=settings.dry_run_timeout_s,
                    memory_bytes=settings.dry_run_memory_bytes,
                    host_memory_bytes=trainer_memory_limit(settings),
                ),
                settings.dry_run_concurrency,
            ),
            heartbeats=app.config.get("GPUYARD_GPU_HEARTBEATS") or GpuBoard(settings.redis_url or None).heartbeats,
            hub=EventHub(settings.redis_url or None, settings.sse_poll_interval_s),
            stream_slots=StreamSlots(
                settings.redis_url or None, settings.max_streams_per_user, ttl_s=3 * settings.sse_keepalive_s
            ),
            send_operation=app.config.get("GPUYARD_OPERATION_QUEUE") or celery_sender(settings, task=OPERATE_TASK),
            wake=functools.partial(EventPublisher(settings.redis_url or None).publish, payload={"event": "wake"}),
        ),
    )


def register_blueprints(app: Flask) -> None:
    """One blueprint per resource, all under /v1 but the OpenAPI document; the dashboard under /ui."""
    for module in (health, datasets, jobs, operations, studies, gpus, users, usage, metrics, openapi):
        app.register_blueprint(module.bp)
    app.register_blueprint(ui_bp)
    app.register_blueprint(ui_root)


def register_errorhandlers(app: Flask) -> None:
    """Every error answers JSON ``{"error", "detail", "field"?}``: one handler for ours, one for HTTP's.

    Details never name a server path: paths under the storage root, the data dir, the temp dir and the
    installation are cut to the file's name (:func:`service.errors.scrub_paths`).
    """
    settings: Settings = services_of(app).settings
    roots = server_roots(settings)

    @app.errorhandler(GpuyardError)
    def handle_gpuyard_error(exc: GpuyardError) -> tuple[Response, int, dict[str, str]]:
        error = to_api_error(exc)
        if error.status_code >= 500:
            app.logger.error("%s: %s", error.code, exc, exc_info=exc)
        return jsonify(_scrubbed(error.to_dict(), roots)), error.status_code, error.headers

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException) -> tuple[Response, int, dict[str, str]]:
        # Also reached for unhandled exceptions, as a 500 InternalServerError (Flask logs the traceback).
        status = exc.code or 500
        code = _HTTP_ERROR_CODES.get(status) or re.sub(r"\W+", "_", (exc.name or "error").lower()).strip("_")
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        body = _scrubbed({"error": code, "detail": exc.description or exc.name}, roots)
        return jsonify(body), status, headers


def register_request_checks(app: Flask) -> None:
    """Limits the app enforces itself, so the answer is our JSON, not the server's HTML page.

    gunicorn (deploy/gunicorn.conf.py) lets headers up to 64 KiB per field and 1000 fields through, so
    these lower limits are the ones a client meets.
    """

    @app.before_request
    def check_headers() -> None:
        fields = request.headers
        if len(fields) > MAX_HEADER_FIELDS:
            raise HeadersTooLarge(f"the request has {len(fields)} header fields; expected at most {MAX_HEADER_FIELDS}")
        total = 0
        for name, value in fields.items():
            size = len(name) + len(value)
            total += size
            if size > MAX_HEADER_FIELD_BYTES:
                raise HeadersTooLarge(
                    f"header {name[:64]!r} is {size} bytes; expected at most {MAX_HEADER_FIELD_BYTES} per field",
                    field=name[:64],
                )
        if total > MAX_HEADER_BYTES:
            raise HeadersTooLarge(f"the headers total {total} bytes; expected at most {MAX_HEADER_BYTES}")


def _scrubbed(body: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    body["detail"] = scrub_paths(str(body["detail"]), roots)
    for problem in body.get("problems", []):
        problem["detail"] = scrub_paths(str(problem.get("detail", "")), roots)
    return body


def services_of(app: Flask) -> Services:
    """The app's services, outside a request."""
    return app.extensions[EXTENSION_KEY]
