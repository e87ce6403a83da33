"""The Celery tasks: thin wrappers around plain functions (``gpuyard.train``, ``gpuyard.notify``,
``gpuyard.operate``)."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from celery.utils.time import get_exponential_backoff_interval

from core.settings import get_settings
from store import Database
from worker.dispatch import Dispatcher
from worker.notify import NotifyFailed, NotifyRefused, deliver, enqueue_notifications
from worker.operations import run_operation
from worker.queues import NOTIFY_TASK, OPERATE_TASK, TRAIN_TASK, celery_notify_sender, celery_sender
from worker.storage import LocalStorage
from worker.studies import advance_and_dispatch
from worker.supervisor import default_owner, supervise

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _database(url: str) -> Database:
    # Opened lazily in the pool process that runs the task, never in the parent before the fork.
    return Database(url)


@shared_task(name=TRAIN_TASK, bind=True)
def train(self: Task, job_id: str) -> dict[str, Any]:
    """Run job ``job_id`` (idempotent: a second delivery finds the lease held and returns at once).

    When the job ends, or is handed back to the queue, a dispatch pass places what now fits, and the
    notifications of jobs that ended go to the notify queue.
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
            dispatch=lambda: advance_and_dispatch(dispatcher),
        )
    finally:
        dispatcher.close()
    if outcome.ran:
        try:
            enqueue_notifications(db, celery_notify_sender(settings, self.app))
        except Exception:  # the job's outcome stands; the janitor's next pass enqueues what is pending
            log.exception("job %s: enqueueing notifications failed", job_id)
    return outcome.to_dict()


@shared_task(name=NOTIFY_TASK, bind=True, max_retries=None, soft_time_limit=120)
def notify(self: Task, job_id: str, url: str) -> str:
    """Tell ``url`` that job ``job_id`` ended (worker/notify.py); runs on the notify queue, never in a request.

    A delivery worth retrying (no answer, 5xx, 429) is retried with exponential backoff (2, 4, 8 … s,
    jittered, at most 10 min apart), ``GPUYARD_NOTIFY_MAX_RETRIES`` times; a refusal is never retried.
    """
    settings = get_settings()
    try:
        return deliver(job_id, url, settings, _database(settings.database_url))
    except NotifyRefused as exc:
        log.warning("job %s: notification refused, not retried: %s", job_id, exc)
        return f"refused: {exc}"
    except NotifyFailed as exc:
        if self.request.retries >= settings.notify_max_retries:
            log.warning("job %s: notification dropped after %d retries: %s", job_id, self.request.retries, exc)
            return f"dropped: {exc}"
        countdown = get_exponential_backoff_interval(2, self.request.retries, 600, full_jitter=True)
        raise self.retry(exc=exc, countdown=countdown) from exc


@shared_task(name=OPERATE_TASK)
def operate(operation_id: str) -> dict[str, Any]:
    """Evaluate, predict with or export a finished job's model (idempotent: only a queued operation runs)."""
    settings = get_settings()
    assert settings.storage_dir is not None  # filled in by Settings
    return run_operation(
        operation_id, settings, db=_database(settings.database_url), storage=LocalStorage(settings.storage_dir)
    )
