"""Fixtures and helpers of the Celery-side tests: a private redis-server, a temporary job DB + storage,
jobs on the digits data set, and real ``celery worker`` processes.

The Redis server is started on a free port for the test session and stopped after it; the system Redis
on 6379 is never touched. Workers are real ``celery worker`` processes (prefork) in their own process
groups, so a test can ``kill -9`` a whole worker the way the OOM killer or a crashed host would.
The fixtures reach the tests through ``conftest.py``, which imports them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port, wait_for  # noqa: F401  (re-exported to the worker tests)

from core.settings import Settings
from store import Database
from worker.storage import LocalStorage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    """Settings for one test: its own SQLite DB and storage, the private Redis, a 3 s lease."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{(tmp_path / 'jobs.db').as_posix()}",
        storage_dir=tmp_path / "storage",
        redis_url=redis_url,
        lease_seconds=3,
        max_attempts=3,
        # one queue per test, so a worker of one test never takes another test's message
        train_queue=f"test.{uuid.uuid4().hex[:8]}",
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"GPUYARD_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    assert settings.storage_dir is not None
    return LocalStorage(settings.storage_dir)


def highway_spec(epochs: int = 2, batch_size: int = 64, **resources: object) -> dict[str, object]:
    """A tiny digits Highway job on the CPU."""
    return {
        "name": "digits-highway",
        "architecture": {"family": "highway", "depth": 2, "width": 32},
        "training": {"epochs": epochs, "batch_size": batch_size},
        "resources": {"gpu": "cpu", **resources},
    }


@pytest.fixture
def make_job(db: Database, storage: LocalStorage, digits_h5: Path) -> Callable[..., str]:
    """Queue a job on the digits data set (stored in this test's storage) and return its id."""
    user, _token = db.create_user(f"u{uuid.uuid4().hex[:8]}")
    with digits_h5.open("rb") as fh:
        stored = storage.put_dataset_stream(fh, max_bytes=10 * 2**20)
    dataset, _ = db.add_dataset(user.id, stored.sha256, stored.size_bytes, {}, stored.key, name="digits")

    def make(spec: dict[str, object], max_attempts: int = 3) -> str:
        return db.create_job(user.id, dataset.id, spec, max_active=100, max_attempts=max_attempts).id

    return make


def events_of(db: Database, job_id: str, kind: str | None = None) -> list[dict[str, object]]:
    """The job's stored events, oldest first, optionally only those of one ``kind``."""
    events = [e.event for e in db.events_since(job_id, 0, limit=100_000)]
    return [e for e in events if kind is None or e.get("event") == kind]


@dataclass
class WorkerProcess:
    """One ``celery worker`` process group started by a test."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the worker leads its own group

    def kill_group(self) -> None:
        """``kill -9`` the worker's whole process group (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real prefork Celery workers on a test's settings; every one is stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, concurrency: int = 1, timeout_s: float = 60.0) -> WorkerProcess:
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        log_path = tmp_path / f"{name}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--pool", "prefork", "-c", str(concurrency), "-Q", settings.train_queue,
            "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=settings_env(settings), start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        worker = WorkerProcess(name=name, proc=proc, log_path=log_path)
        started.append(worker)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {proc.returncode}:\n{worker.log()}")
            return " ready." in worker.log()

        wait_for(ready, timeout_s, f"celery worker {name} to be ready")
        return worker

    yield start
    for worker in started:
        worker.stop()
