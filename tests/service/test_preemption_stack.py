"""Preemption on a real stack: `gpuyard up` on one fake 16 GiB GPU, user A fills it with two priority-0
halves, user B's priority-1 half preempts one; every job ends succeeded with all its epochs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from api_helpers import free_port
from stack_helpers import gpuyard_up

from core.settings import Settings
from core.states import RUNNING, SUCCEEDED
from store import Database
from worker.storage import LocalStorage

FAKE_TRAINER = Path(__file__).resolve().parents[1] / "worker" / "fake_trainer.py"
pytestmark = pytest.mark.slow
EPOCHS = 8


def test_a_priority_1_job_preempts_a_priority_0_job_which_resumes_and_succeeds(tmp_path: Path, digits_h5: Path) -> None:
    data_dir = tmp_path / "stack"
    env = {
        "GPUYARD_FAKE_GPUS": "1x16GiB",
        "GPUYARD_TRAINER_COMMAND": f"{sys.executable} {FAKE_TRAINER}",
        "GPUYARD_JANITOR_INTERVAL_S": "0.5",
        "GPUYARD_PREEMPT_AFTER_S": "0",
        "GPUYARD_PREEMPT_MIN_RUN_S": "0",
    }
    with gpuyard_up(data_dir, free_port(), env=env) as stack:
        db = Database(Settings(data_dir=data_dir).database_url)
        try:
            storage = LocalStorage(data_dir / "storage")
            datasets = {}
            users = {}
            for name, max_priority in (("alice", 0), ("bob", 1)):
                user, _token = db.create_user(name)
                db.set_max_priority(name, max_priority)
                with digits_h5.open("rb") as fh:
                    stored = storage.put_dataset_stream(fh, max_bytes=10 * 2**20)
                datasets[name], _ = db.add_dataset(user.id, stored.sha256, stored.size_bytes, {}, stored.key)
                users[name] = user

            def spec(epochs: int, epoch_s: float) -> dict[str, object]:
                fake = {"epochs": epochs, "epoch_s": epoch_s}
                return {"name": "half", "fake": fake, "resources": {"memory_fraction": 0.5}}

            a_jobs = [
                db.create_job(
                    users["alice"].id, datasets["alice"].id, spec(EPOCHS, 2), max_active=10, max_attempts=1
                ).id
                for _ in range(2)
            ]
            deadline = time.monotonic() + 120
            # Both running and past their first checkpoint, so the victim's resume has something to resume.
            while not all(
                db.get_job(j).state == RUNNING and (db.get_job(j).last_progress or {}).get("epoch") for j in a_jobs
            ):
                assert time.monotonic() < deadline, stack.output()[-3000:]
                time.sleep(0.2)
            b_job = db.create_job(
                users["bob"].id, datasets["bob"].id, spec(3, 1), max_active=10, max_attempts=1, priority=1
            ).id
            submitted = time.monotonic()
            while db.get_job(b_job).started_at is None:
                assert time.monotonic() - submitted < 30, stack.output()[-3000:]
                time.sleep(0.2)
            b_started_after = time.monotonic() - submitted
            assert not all(db.get_job(j).is_terminal for j in a_jobs)  # A's are still unfinished
            deadline = time.monotonic() + 180
            while not all(db.get_job(j).is_terminal for j in [*a_jobs, b_job]):
                assert time.monotonic() < deadline, stack.output()[-3000:]
                time.sleep(0.5)
            jobs = {j: db.get_job(j) for j in [*a_jobs, b_job]}
            events = {j: [e.event for e in db.events_since(j, 0, limit=10_000)] for j in a_jobs}
        finally:
            db.dispose()
    print(f"B started {b_started_after:.1f} s after submit")
    assert all(j.state == SUCCEEDED for j in jobs.values()), [(j.state, j.error_detail) for j in jobs.values()]
    preempted = [j for j in a_jobs if jobs[j].preemptions >= 1]
    assert len(preempted) == 1, [(j, jobs[j].preemptions) for j in a_jobs]
    victim = preempted[0]
    assert [e["by"] for e in events[victim] if e["event"] == "preempted"] == [b_job]
    assert jobs[victim].attempts == 1  # its one attempt was not consumed by the preemption
    for job_id in a_jobs:  # all epochs, each trained once or (the interrupted one) resumed
        finished = {e["epoch"] for e in events[job_id] if e["event"] == "epoch_end"}
        assert finished == set(range(1, EPOCHS + 1)), (job_id, finished)
    resumed = [e.get("resumed_from_epoch") for e in events[victim] if e["event"] == "started"]
    assert len(resumed) == 2 and resumed[1] >= 1
