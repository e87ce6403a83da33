"""The janitor: hands jobs whose worker died (lease expired) back to the queue, or gives up on them.

One pass asks the DB to release every expired lease (``Database.requeue_expired``): a job with attempts
left goes back to ``queued`` and its ``gpuyard.train`` task is sent again; its next attempt resumes from
the last checkpoint in the job's folder. A job out of attempts becomes ``interrupted``; one whose cancel
was requested becomes ``cancelled``. Run one janitor per deployment (several are safe, only wasteful:
each release is a guarded UPDATE that exactly one of them wins).

With a dispatcher (``run_janitor`` in production), requeued jobs are not re-sent to a fixed queue: the
pass ends with a dispatch pass (``worker/dispatch.py``) that places them, every other waiting job and
those whose dispatch went stale (their GPU went offline before a worker took them).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from core.settings import Settings
from worker.celery_app import TRAIN_TASK, make_celery
from worker.db import Database, JanitorReport, JobDBError
from worker.dispatch import Dispatcher, celery_send

log = logging.getLogger(__name__)

Sender = Callable[[str], None]


def celery_sender(settings: Settings) -> Sender:
    """A function that sends ``gpuyard.train(job_id)`` to ``settings.train_queue``."""
    app = make_celery(settings)

    def send(job_id: str) -> None:
        app.send_task(TRAIN_TASK, args=[job_id], queue=settings.train_queue)

    return send


def janitor_pass(
    db: Database,
    send: Sender | None,
    *,
    now: dt.datetime | None = None,
    dispatcher: Dispatcher | None = None,
) -> JanitorReport:
    """Release every lease expired before ``now``; then place the requeued jobs again.

    With a ``dispatcher``: one dispatch pass (requeued, waiting and stale-dispatched jobs alike); a job
    whose task cannot be sent stays queued for the next pass. Without one: ``send(job_id)`` for each
    requeued job (a failing send is logged and leaves that job queued).
    """
    report = db.requeue_expired(now)
    if dispatcher is not None:
        try:
            dispatcher.run(recover=True)
        except JobDBError:
            raise
        except Exception:  # the broker or Redis is down: the next pass tries again
            log.exception("janitor: dispatch pass failed")
    elif send is not None:
        for job_id in report.requeued:
            try:
                send(job_id)
            except Exception:  # kombu/redis raise many kinds; one job's failure must not stop the pass
                log.exception("janitor: job %s requeued but its task could not be sent", job_id)
    if report.requeued or report.interrupted or report.cancelled:
        log.info(
            "janitor: requeued %s, interrupted %s, cancelled %s",
            report.requeued,
            report.interrupted,
            report.cancelled,
        )
    return report


def run_janitor(
    settings: Settings,
    interval_s: float | None = None,
    *,
    stop: threading.Event | None = None,
    db: Database | None = None,
    send: Sender | None = None,
) -> None:
    """Run :func:`janitor_pass` every ``interval_s`` (default: ``settings.janitor_interval_s``) until ``stop``
    is set; a pass that cannot reach the DB is logged and the next one tries again.

    Without ``send`` (production) each pass also dispatches (``worker/dispatch.py``); a test passing
    ``send`` gets the plain re-send of requeued jobs.
    """
    interval = settings.janitor_interval_s if interval_s is None else interval_s
    stop = stop or threading.Event()
    db = db or Database(settings.database_url)
    dispatcher = Dispatcher(settings, db, celery_send(settings)) if send is None else None
    log.info("janitor: every %.1f s on %s", interval, db.url)
    while not stop.is_set():
        try:
            janitor_pass(db, send, dispatcher=dispatcher)
        except JobDBError as exc:
            log.warning("janitor: pass failed: %s", exc)
        stop.wait(interval)
