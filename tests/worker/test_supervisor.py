"""The supervisor, called directly: lease, relay, cancel, time limit, exit codes, duplicate deliveries.

Tests marked ``slow`` run the real trainer (TensorFlow, sklearn digits, a few epochs); the others use
``fake_trainer.py``, which follows the trainer's contract without Keras.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from celery_helpers import events_of, highway_spec, wait_for

from core.names import TRAINED_ARTIFACTS, TRAINER_LOG
from core.settings import Settings
from core.states import CANCELLED, FAILED, QUEUED, SUCCEEDED
from store import Database
from worker import procs
from worker.outcome import classify_exit
from worker.relay import events_channel
from worker.storage import LocalStorage
from worker.supervisor import supervise

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]


def fake_spec(**fake: object) -> dict[str, object]:
    return {"name": "fake", "fake": fake, "resources": {"gpu": "cpu"}}


def job_dir(storage: LocalStorage, job_id: str) -> Path:
    return storage.local_path(storage.job_key(job_id))


class Result(dict):
    """What a thread's target returned (``value``) or raised (re-raised by ``value()``)."""

    def value(self) -> object:
        if "error" in self:
            raise self["error"]
        return self["returned"]


def run_in_thread(target: Callable[[], object]) -> tuple[threading.Thread, Result]:
    result = Result()

    def body() -> None:
        try:
            result["returned"] = target()
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def subscriber(redis_url: str) -> Iterator[Callable[[str], list[dict[str, object]]]]:
    """Subscribe to a job's pub/sub channel; returns the list its messages are appended to."""
    client = redis.Redis.from_url(redis_url)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def subscribe(job_id: str) -> list[dict[str, object]]:
        received: list[dict[str, object]] = []
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(events_channel(job_id))

        def listen() -> None:
            while not stop.is_set():
                message = pubsub.get_message(timeout=0.1)
                if message is not None:
                    received.append(json.loads(message["data"]))
            pubsub.close()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        threads.append(thread)
        return received

    yield subscribe
    stop.set()
    for thread in threads:
        thread.join(2)
    client.close()


# ── the real trainer (acceptance) ────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_supervise_digits_highway_succeeds(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str], subscriber
) -> None:
    job_id = make_job(highway_spec(epochs=2))
    published = subscriber(job_id)

    outcome = supervise(job_id, settings, db=db, storage=storage)

    assert outcome.ran and outcome.state == SUCCEEDED, outcome
    job = db.get_job(job_id)
    assert job.state == SUCCEEDED and job.attempts == 1 and job.exit_code == 0
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.last_progress["stage"] == "finished"
    kinds = [e["event"] for e in events_of(db, job_id)]
    for kind in ("started", "epoch_start", "epoch_end", "checkpoint", "finished"):
        assert kind in kinds
    assert [e["state"] for e in events_of(db, job_id, "state")] == ["queued", "running", "succeeded"]
    folder = job_dir(storage, job_id)
    for name in (*TRAINED_ARTIFACTS, TRAINER_LOG):
        assert (folder / name).is_file(), name
    assert (folder / "checkpoint" / "state.json").is_file()
    assert not (folder / "trainer.pid").exists()
    wait_for(lambda: any(m.get("state") == "succeeded" for m in published), 5, "the final state on pub/sub")
    assert {"started", "epoch_end", "finished"} <= {m["event"] for m in published}
    assert all("seq" in m for m in published)


@pytest.mark.slow
def test_cancel_during_training_stops_the_group_within_5_s(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(highway_spec(epochs=500, batch_size=32))
    thread, result = run_in_thread(lambda: supervise(job_id, settings, db=db, storage=storage))
    wait_for(lambda: events_of(db, job_id, "epoch_end"), 120, "the first epoch to end")
    trainer_pid = events_of(db, job_id, "started")[0]["pid"]
    # The trainer leads its own process group, separate from ours.
    assert os.getpgid(trainer_pid) == trainer_pid != os.getpgid(0)

    requested = time.monotonic()
    db.request_cancel(job_id)
    wait_for(lambda: db.get_job(job_id).state == CANCELLED, 5, "the job to be cancelled")
    elapsed = time.monotonic() - requested

    assert elapsed < 5
    assert not procs.group_alive(trainer_pid)
    thread.join(10)
    assert result.value().state == CANCELLED
    job = db.get_job(job_id)
    assert job.error_reason == "cancelled" and job.lease_owner is None
    print(f"cancelled {elapsed:.2f} s after request_cancel")


@pytest.mark.slow
def test_real_trainer_past_max_runtime_fails_with_time_limit(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(highway_spec(epochs=500, batch_size=32, max_runtime_s=8))
    # A lease far longer than the run: on a loaded box a real trainer's start (TensorFlow's import) can
    # starve the renewal thread past the fixture's 3 s lease, and this test is about the time limit.
    settings = settings.model_copy(update={"lease_seconds": 60})
    outcome = supervise(job_id, settings, db=db, storage=storage)
    job = db.get_job(job_id)
    assert (outcome.state, outcome.reason) == (FAILED, "time_limit")
    assert (job.state, job.error_reason) == (FAILED, "time_limit")


# ── duplicate deliveries ─────────────────────────────────────────────────────────────────────────────
def test_two_concurrent_deliveries_run_one_trainer(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=3, epoch_s=0.3))

    def deliver() -> object:
        return supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)

    runs = [run_in_thread(deliver) for _ in range(2)]
    for thread, _ in runs:
        thread.join(60)
    outcomes = [result.value() for _, result in runs]

    assert sorted(o.ran for o in outcomes) == [False, True]
    assert len(events_of(db, job_id, "started")) == 1
    job = db.get_job(job_id)
    assert job.state == SUCCEEDED and job.attempts == 1


def test_delivery_of_a_finished_job_does_nothing(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=1))
    assert supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == SUCCEEDED
    again = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert not again.ran
    assert len(events_of(db, job_id, "started")) == 1


# ── exit codes, cancel, time limit, hand-back (fake trainer) ────────────────────────────────────────
@pytest.mark.parametrize(
    ("exit_code", "state", "reason"),
    [
        (0, SUCCEEDED, None),
        (1, FAILED, "internal_error"),
        (3, FAILED, "spec_invalid"),
        (4, FAILED, "dataset_invalid"),
        (5, FAILED, "out_of_memory"),
        (7, FAILED, "time_limit"),
    ],
)
def test_exit_code_decides_the_job_state(
    settings: Settings,
    db: Database,
    storage: LocalStorage,
    make_job: Callable[..., str],
    exit_code: int,
    state: str,
    reason: str | None,
) -> None:
    fake = {"epochs": 1} if exit_code == 0 else {"epochs": 3, "exit_code": exit_code}
    job_id = make_job(fake_spec(**fake))
    outcome = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    job = db.get_job(job_id)
    assert (job.state, job.error_reason, job.exit_code) == (state, reason, exit_code)
    assert outcome.state == state
    if exit_code:
        assert job.error_detail == "fake"  # the trainer's own `failed` detail reaches the user


def test_cancel_kills_a_trainer_that_ignores_sigterm_after_the_grace_period(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    settings = settings.model_copy(update={"cancel_grace_s": 1.0})
    job_id = make_job(fake_spec(epochs=1, epoch_s=60, ignore_sigterm=True))
    thread, result = run_in_thread(
        lambda: supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    )
    wait_for(lambda: events_of(db, job_id, "started"), 30, "the fake trainer to start")
    pid = events_of(db, job_id, "started")[0]["pid"]
    requested = time.monotonic()
    db.request_cancel(job_id)
    wait_for(lambda: db.get_job(job_id).state == CANCELLED, 5, "the job to be cancelled")
    assert time.monotonic() - requested < 5
    assert not procs.group_alive(pid)
    thread.join(10)
    assert result.value().exit_code == -signal.SIGKILL


def test_supervisor_enforces_max_runtime_when_the_trainer_does_not(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    settings = settings.model_copy(update={"cancel_grace_s": 0.5})
    spec = fake_spec(epochs=1, epoch_s=60, ignore_sigterm=True)
    spec["resources"] = {"gpu": "cpu", "max_runtime_s": 1}
    job_id = make_job(spec)
    started = time.monotonic()
    outcome = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert time.monotonic() - started < 10
    job = db.get_job(job_id)
    assert (job.state, job.error_reason, outcome.reason) == (FAILED, "time_limit", "time_limit")


def test_trainer_stopped_from_outside_is_handed_back_and_resent(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=3, epoch_s=30))
    resent: list[str] = []
    thread, result = run_in_thread(
        lambda: supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER, requeue=resent.append)
    )
    wait_for(lambda: events_of(db, job_id, "started"), 30, "the fake trainer to start")
    os.killpg(events_of(db, job_id, "started")[0]["pid"], signal.SIGTERM)  # e.g. a host shutdown
    thread.join(30)
    assert result.value().state == QUEUED
    assert db.get_job(job_id).state == QUEUED
    assert resent == [job_id]


def test_retry_resumes_from_the_checkpoint(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=3, epoch_s=0.05))
    # An earlier attempt that checkpointed epoch 2 and whose worker vanished.
    assert db.take_lease(job_id, "dead-worker", 0.01) is not None
    (job_dir(storage, job_id) / "checkpoint").mkdir(parents=True)
    (job_dir(storage, job_id) / "checkpoint" / "state.json").write_text('{"epoch": 2}')
    time.sleep(0.05)
    assert db.requeue_expired().requeued == [job_id]

    outcome = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)

    assert outcome.state == SUCCEEDED and outcome.resumed and outcome.attempt == 2
    assert events_of(db, job_id, "started")[0]["resumed_from_epoch"] == 2
    assert [e["epoch"] for e in events_of(db, job_id, "epoch_end")] == [3]
    assert "resuming from checkpoint" in (job_dir(storage, job_id) / TRAINER_LOG).read_text()


def test_a_trainer_killed_by_sigkill_is_requeued_and_resumes_from_its_checkpoint(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=3, sigkill_after_epoch=1))

    first = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert (first.state, first.reason, first.exit_code) == (QUEUED, "trainer_killed", -signal.SIGKILL)
    assert "peak" in first.detail and "resuming from the checkpoint" in first.detail

    second = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert (second.state, second.attempt, second.resumed) == (SUCCEEDED, 2, True)
    assert [e["resumed_from_epoch"] for e in events_of(db, job_id, "started")] == [None, 1]


def test_a_trainer_killed_again_and_again_fails_out_of_memory_with_its_peak(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec(epochs=3, sigkill_after_epoch=1, sigkill_every_attempt=True, rss_bytes=64 * 2**20))
    assert supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == QUEUED
    outcome = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    job = db.get_job(job_id)
    assert (outcome.state, job.state, job.error_reason) == (FAILED, FAILED, "out_of_memory")
    assert "2 times in a row" in job.error_detail
    peak_mib = int(job.error_detail.split("Its peak was ")[1].split(" MiB")[0])
    assert peak_mib >= 64  # the 64 MiB it held, measured (ru_maxrss), not guessed


def test_a_trainer_over_its_host_memory_limit_is_killed_and_fails_out_of_memory(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    limited = settings.model_copy(update={"trainer_memory_bytes": 150 * 2**20})
    job_id = make_job(fake_spec(epochs=2, epoch_s=5, rss_bytes=300 * 2**20))
    outcome = supervise(job_id, limited, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    job = db.get_job(job_id)
    assert (outcome.state, job.error_reason) == (FAILED, "out_of_memory")
    assert "of host memory, over its limit of 150 MiB (trainer_memory_bytes)" in job.error_detail


def test_missing_dataset_file_fails_the_job(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    job_id = make_job(fake_spec())
    dataset = db.get_dataset(db.get_job(job_id).dataset_id)
    storage.delete(dataset.storage_key)
    outcome = supervise(job_id, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert (outcome.state, outcome.reason) == (FAILED, "dataset_invalid")


def test_classify_exit() -> None:
    assert classify_exit(0, "cancelled", None)[0] == SUCCEEDED  # finished before the signal landed
    assert classify_exit(6, "cancelled", None)[:2] == (CANCELLED, "cancelled")
    assert classify_exit(-9, "cancelled", None)[:2] == (CANCELLED, "cancelled")
    assert classify_exit(6, "time_limit", None)[:2] == (FAILED, "time_limit")
    assert classify_exit(6, None, None)[0] is None  # stopped from outside: hand back
    state, reason, detail = classify_exit(-9, None, None)  # a SIGKILL gpuyard did not send: hand back
    assert (state, reason) == (None, "trainer_killed") and "OOM" in detail
    assert classify_exit(2, None, None)[:2] == (FAILED, "internal_error")
    assert classify_exit(42, None, None)[:2] == (FAILED, "internal_error")
    assert classify_exit(5, None, {"detail": "too big"}) == (FAILED, "out_of_memory", "too big")


# ── process helpers ──────────────────────────────────────────────────────────────────────────────────
def test_trainer_launcher_stops_the_child_when_its_parent_dies(tmp_path: Path) -> None:
    """A supervisor killed with -9 must not leave its trainer running (PR_SET_PDEATHSIG via the launcher)."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from worker import procs\n"
        "p = subprocess.Popen(procs.launcher_argv(['sleep', '60']), start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).resolve().parents[2])
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 20, "the child to start")
        child = psutil.Process(int(pid_file.read_text()))
        wait_for(lambda: child.name() == "sleep", 10, "the launcher to exec the child")
        parent.kill()
        parent.wait(5)
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 5, "the child to die")
    finally:
        parent.kill()
        parent.wait()


def test_stop_stale_trainer_ignores_other_hosts_and_recycled_pids(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_file = tmp_path / "trainer.pid"
        procs.write_pid_file(pid_file, sleeper.pid)
        record = json.loads(pid_file.read_text())
        pid_file.write_text(json.dumps({**record, "host": "elsewhere"}))
        assert procs.stop_stale_trainer(pid_file, 1.0) is None
        pid_file.write_text(json.dumps({**record, "create_time": record["create_time"] - 100}))
        assert procs.stop_stale_trainer(pid_file, 1.0) is None
        assert sleeper.poll() is None
        pid_file.write_text(json.dumps(record))
        assert procs.stop_stale_trainer(pid_file, 1.0) == sleeper.pid
        assert sleeper.wait(5) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()
