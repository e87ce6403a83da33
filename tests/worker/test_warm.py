"""Warm trainers (worker/warm.py): a slot's next trainer is started ahead and gets its job over a pipe.

The supervisor tests use ``fake_trainer.py``, which follows the warm contract (about 1 s in all); the one
marked ``slow`` runs the real trainer warm: TensorFlow imported before the job, cap set on its arrival
(about 20 s on the 2-core box).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery_helpers import WorkerProcess, events_of, highway_spec, wait_for
from trainer_helpers import ROOT, parse_events, trainer_env, write_spec

from core.names import TRAINER_LOG
from core.settings import Settings
from core.states import CANCELLED, SUCCEEDED
from store import Database
from worker import procs, warm
from worker.celery_app import make_celery
from worker.queues import TRAIN_TASK
from worker.storage import LocalStorage
from worker.supervisor import supervise

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]


def fake_spec(backend: str = "tensorflow", **fake: object) -> dict[str, object]:
    return {"name": "fake", "fake": fake, "resources": {"gpu": "cpu", "backend": backend}}


@pytest.fixture
def warm_settings(settings: Settings) -> Iterator[Settings]:
    yield settings.model_copy(update={"warm_trainers": True})
    warm.close_all()


def started(db: Database, job_id: str) -> dict[str, object]:
    return events_of(db, job_id, "started")[0]


def log_of(storage: LocalStorage, job_id: str) -> str:
    return (storage.local_path(storage.job_key(job_id)) / TRAINER_LOG).read_text()


def test_defaults_warm_only_real_gpus(settings: Settings) -> None:
    assert not warm.warm_trainers_enabled(settings, "cpu")
    assert warm.warm_trainers_enabled(settings, "GPU-1234")
    assert not warm.warm_trainers_enabled(settings.model_copy(update={"fake_gpus": "1x16GiB"}), "GPU-1234")
    assert warm.warm_trainers_enabled(settings.model_copy(update={"warm_trainers": True}), "cpu")
    assert not warm.warm_trainers_enabled(settings.model_copy(update={"warm_trainers": False}), "GPU-1234")


def test_the_next_job_gets_the_trainer_started_after_the_last(
    warm_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    first, second = make_job(fake_spec()), make_job(fake_spec())
    assert supervise(first, warm_settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == SUCCEEDED
    pool = warm.pool_for(warm_settings, "cpu", FAKE_TRAINER)
    waiting = pool.waiting
    assert waiting is not None and waiting.alive()  # started as the first job took (or passed) its turn

    assert supervise(second, warm_settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == SUCCEEDED
    assert started(db, second)["pid"] == waiting.proc.pid
    assert started(db, second)["warm"] == "tensorflow"
    assert "warm trainer" in log_of(storage, second).splitlines()[1]
    assert "fake trainer on cpu" in log_of(storage, second)  # its stderr went to the job's log
    assert pool.waiting is not None and pool.waiting.proc.pid != waiting.proc.pid  # the next one is ready


def test_another_backend_starts_cold_and_the_slot_rewarms_for_it(
    warm_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    pool = warm.pool_for(warm_settings, "cpu", FAKE_TRAINER)
    tensorflow_one = pool.start("tensorflow")
    job = make_job(fake_spec(backend="jax"))
    assert supervise(job, warm_settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == SUCCEEDED
    assert started(db, job)["warm"] is None and "cold start" in log_of(storage, job)
    assert procs.has_exited(tensorflow_one.proc)  # discarded, not left behind
    assert pool.waiting is not None and pool.waiting.backend == "jax"


def test_a_dead_or_stale_warm_trainer_is_discarded(
    warm_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    pool = warm.pool_for(warm_settings, "cpu", FAKE_TRAINER)
    dead = pool.start("tensorflow")
    procs.signal_group(dead.proc.pid, signal.SIGKILL)
    wait_for(lambda: procs.has_exited(dead.proc), 5, "the warm trainer to die")
    job = make_job(fake_spec())
    assert supervise(job, warm_settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER).state == SUCCEEDED
    assert started(db, job)["warm"] is None

    stale = pool.waiting
    assert stale is not None
    stale.fingerprint = "started by other settings or code"
    assert pool.take("tensorflow") is None
    assert procs.has_exited(stale.proc)


def test_a_warm_trainer_is_cancelled_as_its_process_group(
    warm_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    fast = warm_settings.model_copy(update={"cancel_grace_s": 0.5, "cancel_poll_s": 0.1})
    warm.pool_for(fast, "cpu", FAKE_TRAINER).start("tensorflow")
    job = make_job(fake_spec(epochs=1000, epoch_s=0.1, ignore_sigterm=True))

    def cancel_once_running() -> bool:
        if not events_of(db, job, "epoch_end"):
            return False
        db.request_cancel(job)
        return True

    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(outcome=supervise(job, fast, db=db, storage=storage, trainer_argv=FAKE_TRAINER))
    )
    thread.start()
    wait_for(cancel_once_running, 20, "the warm trainer's first epoch")
    thread.join(30)
    outcome = result["outcome"]
    assert outcome.state == CANCELLED  # type: ignore[attr-defined]
    assert started(db, job)["warm"] == "tensorflow"
    assert not procs.group_alive(int(started(db, job)["pid"]))  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_trainer_warm_trains_a_job_with_the_cap_set_on_arrival(tmp_path: Path, small_digits_h5: Path) -> None:
    spec = write_spec(tmp_path / "spec.json", highway_spec(epochs=2))
    command = [sys.executable, "-m", "worker.trainer", "--warm", "--backend", "tensorflow", "--gpu", "cpu"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=trainer_env()
    )
    job_argv = ["--spec", str(spec), "--data", str(small_digits_h5), "--out", str(tmp_path / "out"), "--gpu", "cpu"]
    warm.hand_over(process, [*job_argv, "--backend", "tensorflow"], tmp_path / "trainer.log", tmp_path)
    assert process.stdout is not None
    events = parse_events(process.stdout.read().decode())
    assert process.wait(60) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    first = events[0]
    assert first["event"] == "started" and first["backend"] == "tensorflow"
    assert any("warm trainer" in note for note in first["env"]["notes"])
    assert events[-1]["event"] == "finished"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["timings"]["setup_s"] < summary["timings"]["total_s"]
    # The throw-away step the warm trainer ran before the job leaves no trace in it: a cold trainer given
    # the same job trains the same model (same layer names, same seeds) to the same history.
    cold_argv = [*job_argv[:-3], str(tmp_path / "cold"), "--gpu", "cpu", "--backend", "tensorflow"]
    cold = subprocess.run(
        [sys.executable, "-m", "worker.trainer", *cold_argv], capture_output=True, cwd=ROOT, env=trainer_env()
    )
    assert cold.returncode == 0, cold.stderr.decode()[-3000:]
    warm_history = json.loads((tmp_path / "out" / "history.json").read_text())
    cold_history = json.loads((tmp_path / "cold" / "history.json").read_text())
    assert cold_history.keys() == warm_history.keys() and cold_history["epoch"] == warm_history["epoch"]
    for key in sorted(set(warm_history) - {"epoch"}):
        assert cold_history[key] == pytest.approx(warm_history[key], abs=1e-5), key
    cold_started = parse_events(cold.stdout.decode())[0]
    assert cold_started["parameters"] == first["parameters"]


def test_real_trainer_warm_exits_quietly_when_let_go(tmp_path: Path) -> None:
    """End of file instead of a job: the trainer the pool let go exits 0 (imports only; about 5 s)."""
    command = [sys.executable, "-m", "worker.trainer", "--warm", "--backend", "tensorflow", "--gpu", "cpu"]
    done = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, env=trainer_env(), timeout=120
    )
    assert done.returncode == 0 and done.stdout == b""


def test_a_celery_pool_process_warms_its_slot_as_it_starts(
    settings: Settings, db: Database, make_job: Callable[..., str], start_worker: Callable[..., WorkerProcess]
) -> None:
    """A real prefork worker (about 5 s): the pool process starts its warm trainer at init; the job gets it."""
    command = " ".join(FAKE_TRAINER)
    warm_settings = settings.model_copy(update={"warm_trainers": True, "trainer_command": command})
    start_worker(warm_settings)
    job_id = make_job(fake_spec())
    result = make_celery(warm_settings).send_task(TRAIN_TASK, args=[job_id], queue=warm_settings.train_queue)
    assert result.get(timeout=60)["state"] == SUCCEEDED
    assert started(db, job_id)["warm"] == "tensorflow"
