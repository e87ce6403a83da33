"""The GPU memory watchdog and hygiene on fake GPUs: over budget → killed within 2 s while the neighbour
finishes; every GPU job records its peak; a GPU left dirty is quarantined; the real trainer is pinned."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery_helpers import events_of, highway_spec

from core.settings import Settings
from core.states import FAILED, QUEUED, SUCCEEDED
from store import Database
from worker.gpus import GiB, fake_uuid
from worker.outcome import Outcome
from worker.storage import LocalStorage
from worker.supervisor import supervise

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]
GPU0 = fake_uuid(0)


@pytest.fixture
def fake_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"fake_gpus": "2x16GiB", "gpu_watchdog_interval_s": 0.1, "gpu_hygiene_wait_s": 0.5, "redis_url": ""}
    )


def fake_job(fraction: float, **fake: object) -> dict[str, Any]:
    return {"name": "fake", "fake": fake, "resources": {"gpu": "any", "memory_fraction": fraction}}


def run(settings: Settings, db: Database, storage: LocalStorage, job_id: str, gpu: str = GPU0, **kw: Any) -> Outcome:
    return supervise(job_id, settings, db=db, storage=storage, gpu=gpu, trainer_argv=FAKE_TRAINER, **kw)


def test_over_budget_is_killed_within_2_s_and_its_neighbour_finishes(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    # budget 0.25 × 16 GiB = 4 GiB; the hog grows from 1 to 6 GiB half a second in
    hog = make_job(
        fake_job(0.25, epochs=40, epoch_s=0.25, gpu_memory_bytes=GiB, grow_to_bytes=6 * GiB, grow_after_s=0.5)
    )
    neighbour = make_job(fake_job(0.25, epochs=6, epoch_s=0.4, gpu_memory_bytes=2 * GiB))
    outcomes: dict[str, Outcome] = {}
    threads = [
        threading.Thread(target=lambda j=j: outcomes.__setitem__(j, run(fake_settings, db, storage, j)))
        for j in (hog, neighbour)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # killed, then handed back once at its measured peak plus margin (6 GiB × 1.25 = 0.47 of 16 GiB), at
    # least twice its old fraction: 0.5
    assert outcomes[hog].state == QUEUED and outcomes[hog].reason == "memory_budget_exceeded"
    assert "6144 MiB" in outcomes[hog].detail and "memory_fraction 0.5" in outcomes[hog].detail
    job = db.get_job(hog)
    assert job.peak_gpu_memory_bytes == 6 * GiB and job.spec["resources"]["memory_fraction"] == 0.5
    killed_at = [e for e in events_of(db, hog, "state") if e.get("state") == QUEUED][-1]
    assert events_of(db, hog, "resized")[0]["memory_fraction_from"] == 0.25
    assert [e for e in events_of(db, hog, "epoch_end")][-1]["epoch"] < 40  # it did not run to the end
    other = db.get_job(neighbour)
    assert other.state == SUCCEEDED and other.peak_gpu_memory_bytes == 2 * GiB
    assert other.started_at < db.get_job(hog).queued_at + (other.finished_at - other.started_at)
    assert killed_at  # the requeue was recorded as a state event
    # the second attempt fits its new budget and succeeds; the record suggests what to ask for next time
    assert run(fake_settings, db, storage, hog).state == SUCCEEDED
    job = db.get_job(hog)
    assert job.attempts == 2 and job.suggested_memory_fraction == 0.47


def test_a_job_too_big_for_any_budget_fails_with_the_fraction_to_ask_for(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    hog = make_job(
        fake_job(0.25, epochs=40, epoch_s=0.25, gpu_memory_bytes=GiB, grow_to_bytes=15 * GiB, grow_after_s=0.3)
    )
    outcome = run(fake_settings, db, storage, hog)
    assert outcome.state == FAILED and outcome.reason == "memory_budget_exceeded"
    assert "memory_fraction ≥ 1.18" in db.get_job(hog).error_detail  # 15 GiB × 1.25 of a 16 GiB GPU


def test_a_gpu_job_records_its_peak_at_rss_and_a_cpu_job_none(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    on_gpu = make_job(fake_job(0.5, epochs=3, epoch_s=0.2))
    assert run(fake_settings, db, storage, on_gpu).state == SUCCEEDED
    peak = db.get_job(on_gpu).peak_gpu_memory_bytes
    assert 5 * 2**20 < peak < 2 * GiB  # a small Python process's RSS
    on_cpu = make_job(fake_job(0.5, epochs=1))
    assert run(fake_settings, db, storage, on_cpu, gpu="cpu").state == SUCCEEDED
    assert db.get_job(on_cpu).peak_gpu_memory_bytes is None


def test_a_gpu_left_dirty_is_quarantined(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    db.register_gpu(GPU0, host="h", index=0, name="fake", memory_total_bytes=16 * GiB)
    clean = make_job(fake_job(0.25, epochs=1, gpu_memory_bytes=GiB))
    assert run(fake_settings, db, storage, clean).state == SUCCEEDED
    assert not db.get_gpu(GPU0).quarantined
    leaky = make_job(fake_job(0.25, epochs=1, gpu_memory_bytes=GiB, leak_bytes=GiB))
    assert run(fake_settings, db, storage, leaky).state == SUCCEEDED  # the job's result stands
    gpu = db.get_gpu(GPU0)
    assert gpu.quarantined and leaky in gpu.quarantine_reason and "1024 MiB" in gpu.quarantine_reason
    assert db.clear_gpu_quarantine(GPU0).quarantined is False


def test_the_real_trainer_on_a_fake_gpu_is_pinned_to_its_uuid(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    gpu = fake_uuid(1)
    spec = highway_spec(epochs=1, memory_fraction=0.5)
    spec["resources"]["gpu"] = "any"
    job_id = make_job(spec)
    outcome = supervise(job_id, fake_settings, db=db, storage=storage, gpu=gpu)
    assert outcome.state == SUCCEEDED, outcome
    started = events_of(db, job_id, "started")[0]
    assert started["env"]["environ"]["CUDA_VISIBLE_DEVICES"] == gpu
    assert started["env"]["environ"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    summary = json.loads(storage.local_path(storage.job_key(job_id, "summary.json")).read_text())
    assert summary["env"]["environ"]["CUDA_VISIBLE_DEVICES"] == gpu
    job = db.get_job(job_id)
    assert job.gpu == gpu and 0 < job.peak_gpu_memory_bytes < 8 * GiB  # its RSS, within 0.5 × 16 GiB


def test_a_job_with_no_attempts_left_is_not_resized(
    fake_settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    spec = fake_job(0.25, epochs=40, epoch_s=0.25, gpu_memory_bytes=GiB, grow_to_bytes=6 * GiB, grow_after_s=0.3)
    hog = make_job(spec, max_attempts=1)
    outcome = run(fake_settings, db, storage, hog)
    assert outcome.state == FAILED and outcome.reason == "memory_budget_exceeded"
    detail = db.get_job(hog).error_detail
    assert "memory_fraction ≥ 0.5" in detail and "no attempts left (1 of 1)" in detail
    assert events_of(db, hog, "resized") == []
