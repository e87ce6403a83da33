"""End to end through real ``celery worker`` processes, a private Redis and the real trainer.

Duplicate deliveries run one trainer; a worker killed with ``kill -9`` mid-job loses it to the janitor,
and the next worker resumes it from its checkpoint; the worker processes never load a framework.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from celery_helpers import REPO, WorkerProcess, events_of, highway_spec, settings_env, wait_for

from core.settings import Settings
from core.states import RUNNING, SUCCEEDED
from store import Database
from worker.celery_app import make_celery
from worker.dispatch import Dispatcher
from worker.janitor import janitor_pass
from worker.queues import TRAIN_TASK, celery_sender

FRAMEWORKS = ("tensorflow", "keras", "jax", "jaxlib", "torch")
WORKER_MODULES = (
    "worker.celery_app",
    "worker.tasks",
    "worker.supervisor",
    "worker.janitor",
    "cli.workers",
)


def framework_libraries(pid: int) -> list[str]:
    """Mapped files of process ``pid`` that belong to a deep-learning framework."""
    return sorted({m.path for m in psutil.Process(pid).memory_maps() if any(f in m.path for f in FRAMEWORKS)})


def worker_processes(worker: WorkerProcess) -> list[psutil.Process]:
    """The worker's main and pool processes (trainers run in their own process groups: left out)."""
    main = psutil.Process(worker.proc.pid)
    children = [p for p in main.children(recursive=True) if p.is_running() and _pgid(p.pid) == worker.pgid]
    return [main, *children]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_importing_the_worker_side_loads_no_framework() -> None:
    code = (
        f"import sys\nimport {', '.join(WORKER_MODULES)}\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(loaded)\nsys.exit(1 if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"framework modules imported: {done.stdout} {done.stderr[-2000:]}"


@pytest.mark.slow
def test_task_sent_twice_to_a_two_slot_worker_runs_one_trainer(
    settings: Settings, db: Database, make_job: Callable[..., str], start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(settings, concurrency=2)
    job_id = make_job(highway_spec(epochs=2))
    app = make_celery(settings)
    started = time.monotonic()
    results = [app.send_task(TRAIN_TASK, args=[job_id], queue=settings.train_queue) for _ in range(2)]

    outcomes = [r.get(timeout=240) for r in results]
    elapsed = time.monotonic() - started

    assert sorted(o["ran"] for o in outcomes) == [False, True], outcomes
    job = db.get_job(job_id)
    assert job.state == SUCCEEDED and job.attempts == 1, (job.state, job.error_detail)
    assert len(events_of(db, job_id, "started")) == 1
    # The worker's own processes (main + pool) never loaded TensorFlow/JAX/torch: only the trainer did.
    processes = worker_processes(worker)
    assert len(processes) == 3  # main process + 2 pool processes
    for proc in processes:
        assert framework_libraries(proc.pid) == [], proc.cmdline()
    print(f"job through Celery in {elapsed:.1f} s")


@pytest.mark.slow
def test_worker_killed_mid_job_is_resumed_from_its_checkpoint_after_the_janitor(
    settings: Settings, db: Database, make_job: Callable[..., str], start_worker: Callable[..., WorkerProcess]
) -> None:
    first = start_worker(settings)
    job_id = make_job(highway_spec(epochs=8, batch_size=16))
    make_celery(settings).send_task(TRAIN_TASK, args=[job_id], queue=settings.train_queue)

    def checkpointed() -> bool:
        return any(not e.get("partial_epoch") for e in events_of(db, job_id, "checkpoint"))

    wait_for(checkpointed, 180, "the first end-of-epoch checkpoint")
    trainer = psutil.Process(events_of(db, job_id, "started")[0]["pid"])
    first.kill_group()
    killed = time.monotonic()
    # The orphaned trainer is told to stop (parent-death signal), so it never races the next attempt.
    wait_for(
        lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE,
        15,
        "the trainer to stop",
    )
    assert db.get_job(job_id).state == RUNNING  # nobody has noticed yet

    start_worker(settings)
    dispatcher = Dispatcher(settings, db, celery_sender(settings))
    requeued: list[str] = []

    def janitor() -> bool:
        requeued.extend(janitor_pass(db, dispatcher).requeued)
        return bool(requeued)

    wait_for(janitor, settings.lease_seconds + 10, "the janitor to requeue the job", poll_s=0.5)
    requeued_after = time.monotonic() - killed
    wait_for(lambda: db.get_job(job_id).is_terminal, 240, "the resumed job to finish", poll_s=0.5)

    job = db.get_job(job_id)
    assert (job.state, job.attempts) == (SUCCEEDED, 2), (job.state, job.error_reason, job.error_detail)
    first_start, second_start = events_of(db, job_id, "started")
    assert first_start["resumed_from_epoch"] is None
    assert second_start["resumed_from_epoch"] >= 1
    epochs_after_resume = [e["epoch"] for e in events_of(db, job_id, "epoch_end")][-1]
    assert epochs_after_resume == 8
    states = [e["state"] for e in events_of(db, job_id, "state")]
    assert states == ["queued", "running", "queued", "running", "succeeded"]
    resumed_from = second_start["resumed_from_epoch"]
    print(f"requeued {requeued_after:.1f} s after kill -9; resumed from epoch {resumed_from}")


@pytest.mark.slow
def test_cancel_through_the_api_stops_a_job_on_a_real_worker_within_5_s(
    settings: Settings, db: Database, make_job: Callable[..., str], start_worker: Callable[..., WorkerProcess]
) -> None:
    from service.app import create_app

    start_worker(settings)
    job_id = make_job(highway_spec(epochs=50, batch_size=16))
    make_celery(settings).send_task(TRAIN_TASK, args=[job_id], queue=settings.train_queue)
    wait_for(lambda: bool(events_of(db, job_id, "epoch_end")), 180, "the first epoch")
    trainer = psutil.Process(events_of(db, job_id, "started")[0]["pid"])

    _admin, token = db.create_user("canceller", is_admin=True)
    client = create_app({"TESTING": True, "GPUYARD_SETTINGS": settings}).test_client()
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    asked = time.monotonic()
    assert response.status_code < 300, response.get_json()

    wait_for(lambda: db.get_job(job_id).is_terminal, 5, "the job to end after its cancel", poll_s=0.1)
    elapsed = time.monotonic() - asked
    assert db.get_job(job_id).state == "cancelled"
    wait_for(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, 5, "the trainer to go")
    print(f"cancelled through the API in {elapsed:.2f} s")


def test_gpuyard_worker_command_starts_a_worker_with_the_train_task(settings: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "cli-worker.log"
    argv = [sys.executable, "-c", "from cli.main import main; main()", "worker", "-c", "1"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: " ready." in log_path.read_text() or proc.poll() is not None, 60, "the worker to start")
        text = log_path.read_text()
        assert proc.poll() is None, text
        assert TRAIN_TASK in text and f"{settings.train_queue}@" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_gpuyard_janitor_once(settings: Settings, db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job({"name": "x"})
    assert db.take_lease(job_id, "dead-worker", 0.01) is not None
    time.sleep(0.05)
    argv = [sys.executable, "-c", "from cli.main import main; main()", "janitor", "--once"]
    done = subprocess.run(argv, cwd=REPO, env=settings_env(settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"requeued: ['{job_id}']" in done.stdout
    assert db.get_job(job_id).state == "queued"
