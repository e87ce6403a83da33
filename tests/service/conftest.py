"""Fixtures of the API tests: an app on a temporary SQLite DB and storage, users, and a private Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import FakeDryRun, FakeQueue, Tokens, free_port, services
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from core.settings import Settings
from service.app import create_app


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
def app(settings: Settings, queue: FakeQueue, dry_run: FakeDryRun) -> Iterator[Flask]:
    app = create_app(
        {
            "TESTING": True,
            "GPUYARD_SETTINGS": settings,
            "GPUYARD_JOB_QUEUE": queue,
            "GPUYARD_DRY_RUNNER": dry_run,
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


