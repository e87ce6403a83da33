"""worker/submit.py's dry-run placement: a Proposal placed beside the stored jobs, and nothing written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from models.data.summary import DatasetSummary
from store import Database, Dataset
from worker.dispatch import dispatch
from worker.gpus import GiB, fake_uuid
from worker.placement import GPU_FULL, gpu_views
from worker.submit import Submission, would_start

HALF = {"name": "half", "resources": {"gpu": "any", "memory_fraction": 0.5}}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, redis_url="", fake_gpus="1x16GiB", gpu_context_allowance_bytes=0)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    database.migrate()
    database.register_gpu(fake_uuid(0), host="h", index=0, name="fake", memory_total_bytes=16 * GiB)
    yield database
    database.dispose()


def _dataset(db: Database, owner: str) -> Dataset:
    user, _ = db.create_user(owner)
    dataset, _ = db.add_dataset(user.id, "0" * 64, 1, {}, f"datasets/{owner}", name=owner)
    return dataset


def _online(uuids: object) -> dict[str, dict[str, object]]:
    return {u: {"slots": 4, "time": 0.0} for u in uuids}  # type: ignore[attr-defined]  # a Sequence[str]


def _submission(db: Database, dataset: Dataset) -> Submission:
    gpus = gpu_views(db, _online)
    return Submission(dataset.owner_id, dataset, HALF, DatasetSummary.model_construct(), 0, None, gpus)


def test_a_proposal_on_an_idle_gpu_would_start_now_and_nothing_is_written(settings: Settings, db: Database) -> None:
    placement = would_start(db, settings, _submission(db, _dataset(db, "alice")))
    assert (placement.gpu, placement.detail, placement.queue_position) == (fake_uuid(0), "would start now", None)
    assert db.list_jobs(None).jobs == []


def test_a_proposal_behind_a_full_gpu_waits_with_its_place_and_reason(settings: Settings, db: Database) -> None:
    bob = _dataset(db, "bob")
    for _ in range(2):
        db.create_job(bob.owner_id, bob.id, HALF, max_active=10, max_attempts=1)
    assert len(dispatch(db, settings, gpu_views(db, _online), lambda job_id, queue: None).sent) == 2
    placement = would_start(db, settings, _submission(db, _dataset(db, "alice")))
    assert placement.gpu is None and placement.queue_position == 1 and placement.waiting_reason == GPU_FULL
    assert placement.estimated_start_at is not None  # after one of bob's jobs, by the forecast
    assert len(db.list_jobs(None).jobs) == 2
