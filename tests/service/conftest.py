"""Fixtures of the API tests: an app on a temporary SQLite DB and storage, users, and a private Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import FakeDryRun, FakeQueue, Tokens, free_port, services
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from werkzeug.serving import make_server

from core.settings import Settings
from service.app import create_app
from service.client import Client


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "gpuyard",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: tests needing Redis use redis_url
        max_upload_bytes=2 * 2**20,
        max_active_jobs_per_user=2,
        sse_poll_interval_s=0.05,
        validate_cpu_seconds=20,
    )


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def dry_run() -> FakeDryRun:
    return FakeDryRun()


@pytest.fixture
def beats() -> dict[str, dict[str, Any]]:
    """The workers' live heartbeats by GPU uuid (what Redis would hold); a test edits it."""
    return {}


@pytest.fixture
def app(settings: Settings, queue: FakeQueue, dry_run: FakeDryRun, beats: dict[str, dict[str, Any]]) -> Iterator[Flask]:
    app = create_app(
        {
            "TESTING": True,
            "GPUYARD_SETTINGS": settings,
            "GPUYARD_JOB_QUEUE": queue,
            "GPUYARD_OPERATION_QUEUE": queue,
            "GPUYARD_DRY_RUNNER": dry_run,
            "GPUYARD_GPU_HEARTBEATS": lambda uuids: {u: beats[u] for u in uuids if u in beats},
        }
    )
    yield app
    services(app).db.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def tokens(app: Flask) -> Tokens:
    db = services(app).db
    return Tokens(
        alice=db.create_user("alice")[1],
        bob=db.create_user("bob")[1],
        admin=db.create_user("root", is_admin=True)[1],
    )




@pytest.fixture
def server_url(app: Flask) -> Iterator[str]:
    """The app served over HTTP on a free loopback port (werkzeug, threaded), for the Python client."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


@pytest.fixture
def alice(server_url: str, tokens: Tokens) -> Iterator[Client]:
    with Client(server_url, tokens.alice, timeout_s=10) as client:
        yield client
