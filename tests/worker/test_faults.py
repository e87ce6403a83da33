"""Fault injection (a standing test): SIGKILL the trainer, the worker and Redis at random points while
several jobs run; every job must end succeeded, and no two trainers of one job may ever be alive at once.

The jobs use the fake trainer (tests/worker/fake_trainer.py: the trainer's contract without Keras) so the
test spends its time on faults, not on TensorFlow. Real Celery workers (prefork), a real janitor loop,
a real redis-server of the test's own (append-only file, as ``gpuyard up`` runs it, so queued messages
survive its kill), SQLite as the job DB.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from celery_helpers import WorkerProcess, events_of, free_port, wait_for

from core.settings import Settings
from core.states import RUNNING, SUCCEEDED
from store import Database
from worker.dispatch import Dispatcher
from worker.janitor import run_janitor
from worker.queues import celery_sender

FAKE_TRAINER = f"{sys.executable} {Path(__file__).with_name('fake_trainer.py')}"
JOBS = 4
EPOCHS = 20
CHAOS_S = 20.0
SEED = int(os.environ.get("GPUYARD_FAULT_SEED", "20261130"))


class OwnRedis:
    """A redis-server this test may kill and restart on the same port, keeping its append-only file."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not on PATH (make test installs it)")
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--dir", str(self.workdir)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, 10, "the test's redis-server")
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield server
    server.kill()


def trainers_by_job(storage_root: Path) -> Counter[str]:
    """Live (not zombie) fake trainers per job, from their ``--out <storage>/jobs/<id>`` arguments."""
    found: Counter[str] = Counter()
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not any("fake_trainer.py" in c for c in cmdline):
                continue
            if "--out" in cmdline:
                out = cmdline[cmdline.index("--out") + 1]
                if out.startswith(str(storage_root)):
                    found[Path(out).name] += 1
    return found


@pytest.mark.slow
def test_jobs_survive_random_kills_of_trainer_worker_and_redis(
    settings: Settings,
    own_redis: OwnRedis,
    db: Database,
    make_job: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings.model_copy(
        update={
            "redis_url": own_redis.url,
            "trainer_command": FAKE_TRAINER,
            # Random trainer kills are not the OOM killer: never give up on a job for being killed.
            "trainer_kills_before_oom": 1000,
            "janitor_interval_s": 0.5,
        }
    )
    rng = random.Random(SEED)
    # Long enough (4 jobs × 8 s on 2 slots, more with the faults) that jobs run through the whole chaos.
    spec = {"name": "chaos", "fake": {"epochs": EPOCHS, "epoch_s": 0.4}, "resources": {"gpu": "cpu"}}
    job_ids = [make_job(spec, max_attempts=50) for _ in range(JOBS)]
    storage_root = Path(settings.storage_dir or "") / "jobs"

    stop = threading.Event()
    janitor = threading.Thread(
        target=run_janitor, args=(settings,), kwargs={"stop": stop, "db": db, "send": celery_sender(settings)}
    )
    worst: Counter[str] = Counter()
    samples = [0]

    def watch() -> None:
        while not stop.is_set():
            for job_id, count in trainers_by_job(storage_root).items():
                worst[job_id] = max(worst[job_id], count)
            samples[0] += 1
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    workers = [start_worker(settings, concurrency=2)]
    janitor.start()
    watcher.start()
    faults: list[str] = []
    try:
        Dispatcher(settings, db, celery_sender(settings), heartbeats=lambda uuids: {}).run()
        # Every kind of fault at least once per round, in a seeded random order, at random moments.
        plan = ["trainer", "worker", "trainer", "redis"]
        rng.shuffle(plan)
        chaos_ends = time.monotonic() + CHAOS_S
        round_ = 0
        while time.monotonic() < chaos_ends and not all(db.get_job(j).is_terminal for j in job_ids):
            time.sleep(rng.uniform(1.5, 3.5))
            action = plan[round_ % len(plan)]
            round_ += 1
            if action == "trainer":
                running = [j for j in job_ids if db.get_job(j).state == RUNNING]
                started = [events_of(db, j, "started") for j in running]
                pids = [events[-1]["pid"] for events in started if events]
                if pids:
                    pid = rng.choice(pids)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                        faults.append(f"kill -9 trainer {pid}")
            elif action == "worker":
                workers[-1].kill_group()
                faults.append("kill -9 worker")
                workers.append(start_worker(settings, concurrency=2))
            else:
                own_redis.kill()
                faults.append("kill -9 redis")
                time.sleep(rng.uniform(0.2, 1.5))
                own_redis.start()
        wait_for(
            lambda: all(db.get_job(j).is_terminal for j in job_ids),
            180,
            f"every job to finish after {faults}",
            poll_s=0.5,
        )
    finally:
        stop.set()
        janitor.join(10)
        watcher.join(5)
    jobs = [db.get_job(j) for j in job_ids]
    print(f"\nfaults: {faults}\nattempts: {[j.attempts for j in jobs]}, watcher samples: {samples[0]}")
    assert [j.state for j in jobs] == [SUCCEEDED] * JOBS, [(j.state, j.error_reason, j.error_detail) for j in jobs]
    assert len(faults) >= 4 and {f.split()[2] for f in faults} >= {"trainer", "worker", "redis"}
    assert samples[0] > 100
    assert max(worst.values(), default=0) <= 1, f"two trainers of one job alive at once: {dict(worst)}"
    for job in jobs:  # each finished the epochs it had left, resuming rather than starting over
        ends = [e["epoch"] for e in events_of(db, job.id, "epoch_end")]
        assert ends[-1] == EPOCHS
