"""The Flask application factory: ``gunicorn "service.app:create_app()"``."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from core.errors import GpuyardError
from core.settings import Settings, get_settings
from service.api import datasets, gpus, health, jobs, openapi
from service.checks import sandbox_check_dataset, trainer_dry_run
from service.errors import to_api_error
from service.extensions import Services, csrf, init_services
from service.queue import CeleryJobQueue
from service.sessions import init_sessions
from service.ui import bp as ui_bp
from service.ui import root as ui_root
from worker.db import Database
from worker.dispatch import GpuBoard
from worker.storage import LocalStorage

DEFAULT_CONFIG: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # JSON bodies; the upload endpoint raises its own limit
    "MAX_FORM_MEMORY_SIZE": 64 * 1024,  # non-file multipart fields
    "MAX_FORM_PARTS": 16,
    # Components tests may replace: GPUYARD_SETTINGS (Settings), GPUYARD_JOB_QUEUE (JobQueue),
    # GPUYARD_DATASET_CHECKER, GPUYARD_DRY_RUNNER, GPUYARD_GPU_HEARTBEATS (see service.extensions),
    # GPUYARD_DB_SCHEMA (PostgreSQL).
    "GPUYARD_AUTO_MIGRATE": True,
}

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
    app.config.from_mapping(DEFAULT_CONFIG)
    if test_config is not None:
        app.config.from_mapping(test_config)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    return app


def register_extensions(app: Flask) -> None:
    """Open the job DB (migrating it), storage, the job queue and the out-of-process checkers; sessions."""
    settings: Settings = app.config.get("GPUYARD_SETTINGS") or get_settings()
    init_sessions(app, settings)
    csrf.init_app(app)
    db = Database(settings.database_url, schema=app.config.get("GPUYARD_DB_SCHEMA"))
    if app.config["GPUYARD_AUTO_MIGRATE"]:
        db.migrate()
    assert settings.storage_dir is not None  # filled in by Settings
    init_services(
        app,
        Services(
            settings=settings,
            db=db,
            storage=LocalStorage(settings.storage_dir),
            queue=app.config.get("GPUYARD_JOB_QUEUE") or CeleryJobQueue(settings),
            check_dataset=app.config.get("GPUYARD_DATASET_CHECKER")
            or functools.partial(sandbox_check_dataset, settings=settings),
            dry_run=app.config.get("GPUYARD_DRY_RUNNER")
            or functools.partial(trainer_dry_run, timeout_s=settings.dry_run_timeout_s),
            heartbeats=app.config.get("GPUYARD_GPU_HEARTBEATS") or GpuBoard(settings.redis_url or None).heartbeats,
        ),
    )


def register_blueprints(app: Flask) -> None:
    """One blueprint per resource, all under /v1 but the OpenAPI document; the dashboard under /ui."""
    for module in (health, datasets, jobs, gpus, openapi):
        app.register_blueprint(module.bp)
    app.register_blueprint(ui_bp)
    app.register_blueprint(ui_root)


def register_errorhandlers(app: Flask) -> None:
    """Every error answers JSON ``{"error", "detail", "field"?}``: one handler for ours, one for HTTP's."""

    @app.errorhandler(GpuyardError)
    def handle_gpuyard_error(exc: GpuyardError) -> tuple[Response, int, dict[str, str]]:
        error = to_api_error(exc)
        if error.status_code >= 500:
            app.logger.error("%s: %s", error.code, exc, exc_info=exc)
        return jsonify(error.to_dict()), error.status_code, error.headers

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException) -> tuple[Response, int, dict[str, str]]:
        # Also reached for unhandled exceptions, as a 500 InternalServerError (Flask logs the traceback).
        status = exc.code or 500
        code = _HTTP_ERROR_CODES.get(status) or re.sub(r"\W+", "_", (exc.name or "error").lower()).strip("_")
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return jsonify({"error": code, "detail": exc.description or exc.name}), status, headers
