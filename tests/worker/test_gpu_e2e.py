"""End to end on two fake 16 GiB GPUs: ``gpuyard worker --gpus all -c 3`` (one real Celery worker per GPU, 3 slots,
heartbeats in Redis), the dispatcher, and the fake trainer. Eight jobs at 0.5: never more than two at once
on one GPU (from the jobs' recorded start and end times), all succeed, dispatched in FIFO order, and each
trainer inherited its GPU's uuid as CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery_helpers import REPO, events_of, settings_env, wait_for

from core.settings import Settings
from core.states import SUCCEEDED, TERMINAL_STATES
from store import Database
from worker.dispatch import Dispatcher
from worker.gpus import fake_uuid
from worker.heartbeat import heartbeat_key
from worker.queues import celery_sender

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
GPUS = (fake_uuid(0), fake_uuid(1))


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_eight_half_gpu_jobs_on_two_fake_gpus(
    settings: Settings, db: Database, make_job: Callable[..., str], tmp_path: Path
) -> None:
    settings = settings.model_copy(
        update={
            "fake_gpus": "2x16GiB",
            "trainer_command": f"{sys.executable} {FAKE_TRAINER}",
            "gpu_heartbeat_s": 0.5,
            "gpu_watchdog_interval_s": 0.2,
        }
    )
    log_path = tmp_path / "fleet.log"
    argv = [sys.executable, "-c", "from cli.main import main; main()", "worker", "--gpus", "all", "-c", "3"]
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            argv, cwd=REPO, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    client = redis.Redis.from_url(settings.redis_url)
    dispatcher = Dispatcher(settings, db, celery_sender(settings))
    try:
        wait_for(
            lambda: all(client.exists(heartbeat_key(u)) for u in GPUS) or fleet.poll() is not None,
            60,
            "both fake GPUs' heartbeats",
        )
        assert fleet.poll() is None, log_path.read_text()
        wait_for(lambda: log_path.read_text().count(" ready.") >= 2, 60, "both GPU workers to be ready")
        assert [g.uuid for g in db.list_gpus()] == list(GPUS)

        spec = {"name": "half", "fake": {"epochs": 3, "epoch_s": 0.4}, "resources": {"memory_fraction": 0.5}}
        ids = []
        for _ in range(8):  # as POST /v1/jobs does: create, then dispatch
            ids.append(make_job(spec))
            dispatcher.run()

        def all_done() -> bool:
            dispatcher.run()  # what the janitor's periodic pass would do; job ends dispatch too
            return all(db.get_job(j).state in TERMINAL_STATES for j in ids)

        wait_for(all_done, 120, "the eight jobs to finish", poll_s=0.5)
    finally:
        dispatcher.close()
        client.close()
        os.killpg(fleet.pid, signal.SIGTERM)
        fleet.wait(60)

    jobs = [db.get_job(j) for j in ids]
    assert [j.state for j in jobs] == [SUCCEEDED] * 8, [(j.state, j.error_detail) for j in jobs]
    assert {j.gpu for j in jobs} == set(GPUS)
    for uuid in GPUS:
        intervals = [(j.started_at.timestamp(), j.finished_at.timestamp()) for j in jobs if j.gpu == uuid]
        assert max_concurrent(intervals) <= 2, (uuid, intervals)
    assert max_concurrent([(j.started_at.timestamp(), j.finished_at.timestamp()) for j in jobs]) >= 3  # shared
    dispatched = [j.dispatched_at for j in jobs]
    assert dispatched == sorted(dispatched)  # FIFO: no job was placed before an earlier one
    for job in jobs:
        started = events_of(db, job.id, "started")[0]
        assert started["env"]["CUDA_VISIBLE_DEVICES"] == job.gpu  # the worker's pin, inherited
        assert job.peak_gpu_memory_bytes and job.peak_gpu_memory_bytes < 8 * 2**30
    assert not any(client_key_left(settings, u) for u in GPUS)  # offline at once after the fleet stops


def client_key_left(settings: Settings, uuid: str) -> bool:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return bool(client.exists(heartbeat_key(uuid)))
    finally:
        client.close()
