"""Sending jobs to the workers: a Celery task sent by NAME, so the API never imports worker code."""

from __future__ import annotations

from typing import Protocol

from celery import Celery

from core.settings import Settings
from service.errors import ServiceUnavailable

TRAIN_TASK = "gpuyard.train"


class JobQueue(Protocol):
    """Where the API puts queued jobs. Tests substitute a list."""

    def enqueue(self, job_id: str, queue: str | None = None) -> None:
        """Send one job to the workers' ``queue`` (default: the CPU queue, ``train_queue``); raise
        ServiceUnavailable when the broker cannot be reached. The dispatcher picks the queue."""
        ...


def make_celery(settings: Settings) -> Celery:
    """A producer-only Celery app on the Redis broker, configured for quick failure instead of long retries.

    Args:
        settings: supplies ``redis_url``.
    """
    celery = Celery("gpuyard-api", broker=settings.redis_url, set_as_current=False)
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        # Publishing retries block the HTTP request: a few quick ones, then 503.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return celery


class CeleryJobQueue:
    """:class:`JobQueue` sending ``gpuyard.train(job_id)`` to a queue (``train_queue`` or ``gpu.<uuid>``)."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue = settings.train_queue

    def enqueue(self, job_id: str, queue: str | None = None) -> None:
        try:
            self.celery.send_task(TRAIN_TASK, args=[job_id], queue=queue or self.queue)
        except Exception as exc:  # kombu and redis raise a zoo of connection errors; all mean the same here
            raise ServiceUnavailable(
                f"the job queue is unreachable ({type(exc).__name__}); the job was not started",
                code="queue_unavailable",
            ) from exc
