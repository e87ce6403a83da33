"""The Celery tasks: thin wrappers that hand a job id to the supervisor (``gpuyard.train``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Task, shared_task

from core.settings import get_settings
from worker.db import Database
from worker.dispatch import Dispatcher
from worker.queues import TRAIN_TASK, celery_sender
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
