"""A stalled upload is cut off after ``upload_read_timeout_s`` with 408, and its staging file goes at once."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from api_helpers import Tokens, free_port, serving

from core.settings import Settings
from service.stack import gunicorn_argv
from store import Database

TIMEOUT_S = 1.5


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "gpuyard",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        max_upload_bytes=2 * 2**20,
        upload_read_timeout_s=TIMEOUT_S,
    )


def _staging_files(settings: Settings) -> list[Path]:
    assert settings.storage_dir is not None
    staging = settings.storage_dir / "tmp"
    return list(staging.iterdir()) if staging.is_dir() else []


@pytest.fixture
def gunicorn_server(tmp_path: Path) -> Iterator[tuple[str, Settings, str]]:
    """gunicorn as ``gpuyard api`` runs it (gevent workers), on a private DB; its URL, settings, a token."""
    settings = Settings(
        data_dir=tmp_path / "gunicorn",
        database_url=f"sqlite:///{(tmp_path / 'jobs.db').as_posix()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        upload_read_timeout_s=TIMEOUT_S,
    )
    db = Database(settings.database_url)
    db.migrate()
    token = db.create_user("alice")[1]
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    env.update(
        GPUYARD_DATA_DIR=str(settings.data_dir),
        GPUYARD_DATABASE_URL=settings.database_url,
        GPUYARD_REDIS_URL=settings.redis_url,
        GPUYARD_UPLOAD_READ_TIMEOUT_S=str(TIMEOUT_S),
    )
    port = free_port()
    with serving(gunicorn_argv("127.0.0.1", port, 1), env, tmp_path, port) as url:
        yield url, settings, token


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_upload_is_cut_off_and_its_staging_file_removed(
    server_url: str, settings: Settings, tokens: Tokens, framing: str
) -> None:
    _stall_an_upload(server_url, settings, tokens.alice, framing)


def test_gunicorn_cuts_off_a_stalled_upload(gunicorn_server: tuple[str, Settings, str]) -> None:
    url, settings, token = gunicorn_server
    _stall_an_upload(url, settings, token, "content-length")
    assert requests.get(url + "/v1/health", timeout=5).status_code == 200


def _stall_an_upload(server_url: str, settings: Settings, token: str, framing: str) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    length = "Content-Length: 100000" if framing == "content-length" else "Transfer-Encoding: chunked"
    sock.sendall(
        (
            f"POST /v1/datasets?name=stalled.h5 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/x-hdf5\r\n{length}\r\n\r\n"
        ).encode()
    )
    part = b"\x89HDF\r\n\x1a\n" + b"\0" * 2000
    sock.sendall(part if framing == "content-length" else f"{len(part):x}\r\n".encode() + part + b"\r\n")
    deadline = time.monotonic() + 20
    while not _staging_files(settings):  # the server is receiving it
        assert time.monotonic() < deadline, "the upload never reached its staging file"
        time.sleep(0.05)
    stalled_at = time.monotonic()

    answer = b""
    while chunk := sock.recv(65536):  # the server answers, then closes the connection
        answer += chunk
    waited = time.monotonic() - stalled_at
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"request_timeout" in answer and b"upload_read_timeout_s" in answer
    assert TIMEOUT_S * 0.5 <= waited < TIMEOUT_S + 10
    assert _staging_files(settings) == []
