"""Small helpers shared by the API tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from flask import Flask
from flask.testing import FlaskClient
from support import free_port  # noqa: F401  (re-exported to the service tests)

from service.extensions import Services
from store import Database
from worker.errors import QueueUnavailable
from worker.gpus import GiB, fake_uuid


def services(app: Flask) -> Services:
    """The app's long-lived parts (DB, storage, queue, ...)."""
    return app.extensions["gpuyard"]

GOOD_SPEC: dict[str, Any] = {"architecture": {"family": "mlp", "widths": [16]}, "training": {"epochs": 1}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client: FlaskClient, token: str, path: Path) -> Any:
    return client.post("/v1/datasets", data=path.read_bytes(), content_type="application/x-hdf5", headers=bearer(token))


def assert_error_body(response: Any, status: int, error: str | None = None) -> dict[str, Any]:
    """Every error is JSON {"error", "detail", "field"?}, never HTML."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"]
    assert set(body) <= {"error", "detail", "field", "problems"}
    assert "Traceback" not in response.get_data(as_text=True)
    if error is not None:
        assert body["error"] == error
    return body


@dataclass
class FakeQueue:
    """A :data:`worker.queues.Sender` standing in for Celery: records what would have been sent where."""

    sent: list[str] = field(default_factory=list)
    queues: dict[str, str | None] = field(default_factory=dict)
    down: bool = False

    def __call__(self, job_id: str, queue: str) -> None:
        if self.down:
            raise QueueUnavailable("the job queue is unreachable (test)")
        self.sent.append(job_id)
        self.queues[job_id] = queue


@dataclass
class FakeDryRun:
    """Stands in for the trainer's dry-run subprocess (which imports Keras)."""

    calls: list[tuple[dict[str, Any], Path]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=lambda: {"ok": True, "parameters": 1234, "layers": []})

    def __call__(self, spec: dict[str, Any], data_path: Path, summary: Any) -> dict[str, Any]:
        self.calls.append((spec, data_path))
        return {"report": self.report, "env": {"backend": "tensorflow"}}


@dataclass
class Tokens:
    alice: str
    bob: str
    admin: str

    @staticmethod
    def header(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


# ── fake GPUs registered through the job DB, with heartbeats a test edits ──
GPU0, GPU1 = fake_uuid(0), fake_uuid(1)
MLP = {"architecture": {"family": "mlp", "widths": [16]}, "training": {"epochs": 1}}




def _db(app: Flask) -> Database:
    return app.extensions["gpuyard"].db


def register_two(app: Flask, beats: dict[str, dict[str, Any]], *, online: tuple[str, ...] = (GPU0, GPU1)) -> None:
    for index, uuid in enumerate((GPU0, GPU1)):
        _db(app).register_gpu(uuid, host="node1", index=index, name="Fake GPU 16 GiB", memory_total_bytes=16 * GiB)
        if uuid in online:
            beats[uuid] = {
                "host": "node1",
                "slots": 4,
                "memory_total_bytes": 16 * GiB,
                "memory_used_bytes": 0,
                "utilization_percent": 0,
                "processes": [],
                "foreign_bytes": 0,
                "gpuyard_bytes": 0,
                "time": 1.0,
            }


def submit(client: FlaskClient, token: str, dataset_id: str, **resources: Any) -> Any:
    spec = {**MLP, "resources": resources}
    return client.post("/v1/jobs", json={"dataset": dataset_id, "spec": spec}, headers=bearer(token))


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str], workdir: Path, port: int) -> Iterator[str]:
    """Run a server (gunicorn as ``gpuyard api`` runs it) until ``/v1/health`` answers; yield its URL, stop it
    after. Its output goes to ``workdir/gunicorn.log``, quoted if it dies while starting."""
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(url + "/v1/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
