"""The API sweeps what killed uploads left in storage tmp/ when it starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from api_helpers import FakeQueue

from core.settings import Settings
from service.app import create_app
from worker.storage import LocalStorage


def test_the_api_sweeps_stale_staging_files_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "gy", tmp_max_age_s=60)
    assert settings.storage_dir is not None
    tmp = LocalStorage(settings.storage_dir).root / "tmp"
    stale, fresh = tmp / "upload.killed.h5", tmp / "upload.arriving.h5"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 120
    os.utime(stale, (old, old))
    app = create_app({"TESTING": True, "GPUYARD_SETTINGS": settings, "GPUYARD_JOB_QUEUE": FakeQueue()})
    try:
        assert not stale.exists() and fresh.exists()
    finally:
        app.extensions["gpuyard"].db.dispose()
