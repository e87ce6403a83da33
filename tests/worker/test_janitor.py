"""The janitor: expired leases are requeued (and their task re-sent), interrupted or cancelled."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from celery_helpers import wait_for

from core.settings import Settings
from core.states import CANCELLED, INTERRUPTED, QUEUED, RUNNING
from store import Database
from worker.dispatch import Dispatcher
from worker.errors import QueueUnavailable
from worker.janitor import janitor_pass, run_janitor

SPEC = {"name": "janitor", "resources": {"gpu": "cpu"}}


def recorder(db: Database, sent: list[str], fail: str | None = None) -> Dispatcher:
    """A dispatcher (no GPUs registered: everything goes to the CPU queue) recording each job it sends."""

    def send(job_id: str, queue: str) -> None:
        if job_id == fail:
            raise QueueUnavailable("broker down")
        sent.append(job_id)

    return Dispatcher(Settings(database_url=db.url, redis_url=""), db, send, heartbeats=lambda uuids: {})


def expire(db: Database, job_id: str, owner: str = "dead-worker") -> None:
    """Take the job's lease for a worker that dies at once (a 10 ms lease, then nothing)."""
    assert db.take_lease(job_id, owner, 0.01) is not None
    time.sleep(0.03)


def test_expired_lease_is_requeued_and_its_task_sent_again(db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job(SPEC)
    expire(db, job_id)
    sent: list[str] = []

    report = janitor_pass(db, recorder(db, sent))

    assert report.requeued == [job_id] and sent == [job_id]
    job = db.get_job(job_id)
    assert job.state == QUEUED and job.lease_owner is None and job.attempts == 1
    # the next delivery counts the second attempt
    assert db.take_lease(job_id, "next-worker", 60).attempts == 2


def test_live_lease_is_left_alone(db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job(SPEC)
    assert db.take_lease(job_id, "live-worker", 60) is not None
    sent: list[str] = []
    report = janitor_pass(db, recorder(db, sent))
    assert report.requeued == [] and sent == []
    assert db.get_job(job_id).state == RUNNING


def test_job_out_of_attempts_is_interrupted_not_resent(db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job(SPEC, max_attempts=1)
    expire(db, job_id)
    sent: list[str] = []
    report = janitor_pass(db, recorder(db, sent))
    assert report.interrupted == [job_id] and sent == []
    job = db.get_job(job_id)
    assert (job.state, job.error_reason) == (INTERRUPTED, "worker_lost")


def test_expired_job_with_a_cancel_request_is_cancelled(db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job(SPEC)
    expire(db, job_id)
    db.request_cancel(job_id)
    sent: list[str] = []
    assert janitor_pass(db, recorder(db, sent)).cancelled == [job_id]
    assert db.get_job(job_id).state == CANCELLED and sent == []


def test_a_failing_send_does_not_stop_the_pass(db: Database, make_job: Callable[..., str]) -> None:
    first, second = make_job(SPEC), make_job(SPEC)
    expire(db, first)
    expire(db, second)
    sent: list[str] = []
    report = janitor_pass(db, recorder(db, sent, fail=first))
    assert sorted(report.requeued) == sorted([first, second]) and sent == [second]


def test_run_janitor_loops_until_stopped(settings: Settings, db: Database, make_job: Callable[..., str]) -> None:
    job_id = make_job(SPEC)
    sent: list[str] = []
    stop = threading.Event()
    loop = threading.Thread(
        target=run_janitor,
        args=(settings, 0.1),
        kwargs={"stop": stop, "db": db, "send": lambda job_id, queue: sent.append(job_id)},
    )
    stale = Path(settings.storage_dir or "") / "tmp" / "upload.killed.h5"  # an upload killed mid-way
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - settings.tmp_max_age_s - 60,) * 2)
    fresh = stale.with_name("upload.live.h5")
    fresh.write_bytes(b"still coming")
    loop.start()
    try:
        expire(db, job_id)
        wait_for(lambda: sent == [job_id], 5, "the janitor loop to requeue the job")
        wait_for(lambda: not stale.exists(), 5, "the janitor to sweep the stale staging file")
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()
    assert fresh.exists()  # a live upload's file stays
