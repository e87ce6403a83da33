"""Pack by default: `gpuyard up` on two fake 16 GiB GPUs, with no flag, runs four jobs at the default
memory fraction (0.25) on one GPU at the same time — the dispatcher decides, a GPU's worker has 4 slots."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from api_helpers import free_port
from stack_helpers import gpuyard_up

from core.settings import Settings
from core.states import SUCCEEDED
from store import Database
from worker.storage import LocalStorage

FAKE_TRAINER = Path(__file__).resolve().parents[1] / "worker" / "fake_trainer.py"
pytestmark = pytest.mark.slow


def test_up_packs_four_quarter_jobs_onto_one_fake_gpu(tmp_path: Path, digits_h5: Path) -> None:
    data_dir = tmp_path / "stack"
    env = {
        "GPUYARD_FAKE_GPUS": "2x16GiB",
        "GPUYARD_TRAINER_COMMAND": f"{sys.executable} {FAKE_TRAINER}",
        "GPUYARD_JANITOR_INTERVAL_S": "0.5",
    }
    with gpuyard_up(data_dir, free_port(), env=env) as stack:
        settings = Settings(data_dir=data_dir)
        db = Database(settings.database_url)
        try:
            user, _token = db.create_user("packer")
            storage = LocalStorage(data_dir / "storage")
            with digits_h5.open("rb") as fh:
                stored = storage.put_dataset_stream(fh, max_bytes=10 * 2**20)
            dataset, _ = db.add_dataset(user.id, stored.sha256, stored.size_bytes, {}, stored.key)
            # The fake trainer's own spec key, and four quarters of a GPU.
            spec = {"name": "packed", "fake": {"epochs": 3, "epoch_s": 2}, "resources": {"memory_fraction": 0.25}}
            job_ids = [db.create_job(user.id, dataset.id, spec, max_active=10, max_attempts=1).id for _ in range(4)]
            deadline = time.monotonic() + 120  # the janitor's dispatch pass places them (every 0.5 s)
            while not all(db.get_job(j).is_terminal for j in job_ids):
                assert time.monotonic() < deadline, stack.output()[-3000:]
                time.sleep(0.5)
            jobs = [db.get_job(j) for j in job_ids]
        finally:
            db.dispose()
    assert [j.state for j in jobs] == [SUCCEEDED] * 4, [(j.state, j.error_detail) for j in jobs]
    assert len({j.gpu for j in jobs}) == 1 and jobs[0].gpu.startswith("GPU-")  # one GPU, best fit
    latest_start = max(j.started_at for j in jobs)
    earliest_end = min(j.finished_at for j in jobs)
    assert latest_start < earliest_end, "the four jobs did not all run at the same time"
