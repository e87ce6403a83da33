"""The Celery tasks: thin wrappers that hand a job id to the supervisor (``gpuyard.train``), or an operation
id to the operation runner (``gpuyard.operate``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Task, shared_task

from core.settings import get_settings
from worker.db import Database
from worker.dispatch import Dispatcher
from worker.operations import run_operation
from worker.queues import OPERATE_TASK, TRAIN_TASK, celery_sender
from worker.storage import LocalStorage
from worker.supervisor import default_owner, supervise


@lru_cache(maxsize=1)
def _database(url: str) -> Database:
    # Opened lazily in the pool process that runs the task, never in the parent before the fork.
    return Database(url)


@shared_task(name=TRAIN_TASK, bind=True)
def train(self: Task, job_id: str) -> dict[str, Any]:
    """Run job ``job_id`` (idempotent: a second delivery finds the lease held and returns at once).

    When the job ends, or is handed back to the queue, a dispatch pass places what now fits.
    """
    settings = get_settings()
    db = _database(settings.database_url)

    dispatcher = Dispatcher(settings, db, celery_sender(settings, self.app))
    try:
        outcome = supervise(
            job_id,
            settings,
            db=db,
            owner=default_owner(self.request.id),
            dispatch=dispatcher.run,
        )
    finally:
        dispatcher.close()
    return outcome.to_dict()


@shared_task(name=OPERATE_TASK)
def operate(operation_id: str) -> dict[str, Any]:
    """Evaluate, predict with or export a finished job's model (idempotent: only a queued operation runs)."""
    settings = get_settings()
    assert settings.storage_dir is not None  # filled in by Settings
    return run_operation(
        operation_id, settings, db=_database(settings.database_url), storage=LocalStorage(settings.storage_dir)
    )
