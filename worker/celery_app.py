"""The Celery application: built by ``make_celery(settings)``, configured for hour-long trainer jobs.

Nothing here imports TensorFlow, JAX or torch, and nothing is built at import time: ``celery -A
worker.celery_app worker`` reaches the module attribute ``app``, which is created on first access from
the process's settings.
"""

from __future__ import annotations

import shlex

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from core.settings import Settings, get_settings
from models.spec import ResourcesSpec
from worker.queues import cpu_queue
from worker.warm import close_all, default_trainer_argv, pool_for, slot_uses_warm_trainers


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the gpuyard Celery app: Redis broker and result backend, late acks, no prefetch.

    A job holds its pool slot for hours, so: acknowledge only after the task returns (``task_acks_late``)
    and give the message back when the pool process dies (``task_reject_on_worker_lost``); reserve one
    message at a time and none ahead (``worker_prefetch_multiplier=1``, ``worker_disable_prefetch``), so
    no job waits behind another in a busy worker's buffer. Redis redelivers a message that is not acked
    within ``visibility_timeout`` even though its first run goes on; the job DB's lease makes such a
    second delivery a no-op, and the janitor, not redelivery, is what restarts a job whose worker died —
    after ``lease_seconds``, long before the visibility timeout.

    Raises:
        ValueError: the visibility timeout is not longer than a lease, so Redis would redeliver
            messages before the janitor could tell a dead worker from a live one.
    """
    settings = settings or get_settings()
    if settings.visibility_timeout_s <= 2 * settings.lease_seconds:
        raise ValueError(
            "Expected visibility_timeout_s greater than twice lease_seconds. "
            f"Received: visibility_timeout_s={settings.visibility_timeout_s}, "
            f"lease_seconds={settings.lease_seconds}"
        )
    app = Celery("gpuyard", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # The dispatcher sends CPU jobs to the CPU queue, GPU jobs to gpu.<uuid> (worker/queues.py).
        task_default_queue=cpu_queue(settings),
        task_create_missing_queues=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        # Task events for Flower and `celery events`: the worker's (received, started, succeeded, …) and the
        # sender's task-sent (producers in worker/queues.py send it too).
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


def _warm_slot(**_: object) -> None:
    """In each new pool process: start its slot's warm trainer now, so the first job is warm too."""
    settings = get_settings()
    gpu = settings.worker_gpu
    if slot_uses_warm_trainers(settings, gpu, substituted=bool(settings.trainer_command)):
        argv = shlex.split(settings.trainer_command) or default_trainer_argv()
        pool_for(settings, gpu, argv).start(ResourcesSpec.model_fields["backend"].default)


def _let_warm_trainers_go(**_: object) -> None:
    close_all()


worker_process_init.connect(_warm_slot, weak=False)
worker_process_shutdown.connect(_let_warm_trainers_go, weak=False)

_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    # ``celery -A worker.celery_app`` looks up ``app``; build it lazily, once, from the environment.
    global _app
    if name == "app":
        if _app is None:
            _app = make_celery()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
