"""Where jobs go and the one way to send them: the task name, the queue names, the sender.

::

    gpuyard.train(job_id) ──▶ gpu.<uuid>       one queue per GPU, consumed by that GPU's worker only
                          ──▶ <cpu queue>      CPU jobs: the setting GPUYARD_TRAIN_QUEUE ("gpuyard.jobs")
    gpuyard.notify(job_id, url) ──▶ <notify queue>  GPUYARD_NOTIFY_QUEUE ("gpuyard.notify"), every worker
    gpuyard.operate(op_id) ─▶ <cpu queue>      evaluate / predict / export a finished job's model

The dispatcher (``worker/dispatch.py``) picks the queue; the API, the janitor and the task itself all send
through :func:`celery_sender`. Nothing here imports a framework.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from celery import Celery

from core.settings import Settings
from worker.errors import QueueUnavailable

TRAIN_TASK = "gpuyard.train"
NOTIFY_TASK = "gpuyard.notify"
OPERATE_TASK = "gpuyard.operate"
GPU_QUEUE_PREFIX = "gpu."
_GPU_UUID = re.compile(r"^GPU-[0-9A-Za-z-]+$")

Sender = Callable[[str, str], None]
"""``send(job_id, queue)``: put ``gpuyard.train(job_id)`` on ``queue``; raise :class:`QueueUnavailable`
when the broker cannot take it."""


def cpu_queue(settings: Settings) -> str:
    """The queue of CPU jobs (``resources.gpu: cpu``, or every job where no GPU is registered)."""
    return settings.train_queue


def notify_queue(settings: Settings) -> str:
    """The queue of notification tasks; every gpuyard worker consumes it beside its training queue."""
    return settings.notify_queue


def gpu_queue(gpu_uuid: str) -> str:
    """The queue of one GPU's worker: ``gpu.<uuid>``.

    Raises:
        ValueError: ``gpu_uuid`` is not an NVML UUID such as ``GPU-5c1a...``.
    """
    if not _GPU_UUID.match(gpu_uuid):
        raise ValueError(f"Expected a GPU UUID like 'GPU-5c1a…'. Received: gpu_uuid={gpu_uuid!r}")
    return GPU_QUEUE_PREFIX + gpu_uuid


def queue_for(gpu: str | None, settings: Settings) -> str:
    """The queue a job placed on ``gpu`` goes to: :func:`gpu_queue`, or the CPU queue for ``cpu``/None."""
    return cpu_queue(settings) if gpu is None or gpu == "cpu" else gpu_queue(gpu)


def producer(settings: Settings) -> Celery:
    """A send-only Celery app on the Redis broker that fails fast instead of retrying for long.

    A few quick publish retries, then :class:`QueueUnavailable`: callers (an HTTP request, a dispatch
    pass) must not hang on a dead broker.
    """
    app = Celery("gpuyard-producer", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=True,  # Flower shows a task as sent before a worker takes it
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )
    return app


def celery_sender(settings: Settings, app: Celery | None = None, *, task: str = TRAIN_TASK) -> Sender:
    """A :data:`Sender` of ``task`` (default ``gpuyard.train``) through ``app`` (default: a :func:`producer`
    on the broker); ``send(op_id, queue)`` with ``task=OPERATE_TASK`` sends a model operation."""
    app = app or producer(settings)

    def send(job_id: str, queue: str) -> None:
        try:
            app.send_task(task, args=[job_id], queue=queue)
        except Exception as exc:  # kombu and redis raise a zoo of connection errors; all mean the same here
            raise QueueUnavailable(
                f"the job queue is unreachable ({type(exc).__name__}); {job_id} was not sent"
            ) from exc

    return send


def celery_notify_sender(settings: Settings, app: Celery | None = None) -> Callable[[str, str], None]:
    """``send(job_id, url)``: put ``gpuyard.notify(job_id, url)`` on the notify queue through ``app``.

    Raises (from ``send``):
        QueueUnavailable: the broker cannot take it.
    """
    app = app or producer(settings)

    def send(job_id: str, url: str) -> None:
        try:
            app.send_task(NOTIFY_TASK, args=[job_id, url], queue=notify_queue(settings))
        except Exception as exc:  # kombu and redis raise a zoo of connection errors; all mean the same here
            raise QueueUnavailable(f"the notify queue is unreachable ({type(exc).__name__}) for job {job_id}") from exc

    return send
