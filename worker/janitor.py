"""The janitor: hands jobs whose worker died (lease expired) back to the queue, or gives up on them.

One pass asks the DB to release every expired lease (``Database.requeue_expired``): a job with attempts
left goes back to ``queued`` and its ``gpuyard.train`` task is sent again; its next attempt resumes from
the last checkpoint in the job's folder. A job out of attempts becomes ``interrupted``; one whose cancel
was requested becomes ``cancelled``. Run one janitor per deployment (several are safe, only wasteful:
each release is a guarded UPDATE that exactly one of them wins).

Each pass also hands the notifications of jobs that ended since the last one to the notify queue
(``worker/notify.py``): the supervisor does so after every job it ran, the janitor catches the rest
(cancelled while queued, given up here, refused by a dead broker) and whatever a broken queue left.

Requeued jobs are not re-sent to a fixed queue: the pass ends with a dispatch pass
(``worker/dispatch.py``) that places them, every other waiting job and
those whose dispatch went stale (their GPU went offline before a worker took them).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from core.settings import Settings
from store import Database, JanitorReport
from store.errors import JobDBError
from worker.dispatch import Dispatcher
from worker.notify import NotifySender, enqueue_notifications
from worker.queues import Sender, celery_notify_sender, celery_sender
from worker.storage import LocalStorage
from worker.studies import advance_and_dispatch

log = logging.getLogger(__name__)


def janitor_pass(db: Database, dispatcher: Dispatcher, *, now: dt.datetime | None = None) -> JanitorReport:
    """Release every lease expired before ``now``, advance the studies (worker/studies.py: a trial whose job
    ended is told, new trials asked), then one dispatch pass: the requeued jobs, every other waiting job
    and those whose dispatch went stale are placed again. A job whose task cannot be sent stays queued for
    the next pass.
    """
    report = db.requeue_expired(now)
    try:
        advance_and_dispatch(dispatcher, recover=True)  # studies first: their new trials are placed too
    except JobDBError:
        raise
    except Exception:  # the broker or Redis is down: the next pass tries again
        log.exception("janitor: dispatch pass failed")
    if report.requeued or report.interrupted or report.cancelled:
        log.info(
            "janitor: requeued %s, interrupted %s, cancelled %s",
            report.requeued,
            report.interrupted,
            report.cancelled,
        )
    return report


def sweep_tmp(storage: LocalStorage, max_age_s: float) -> int:
    """Remove upload staging files older than ``max_age_s`` (uploads killed mid-way); never raises."""
    try:
        swept = storage.sweep_tmp(max_age_s)
    except OSError as exc:
        log.warning("janitor: cannot sweep %s: %s", storage.root / "tmp", exc)
        return 0
    if swept:
        log.info("janitor: removed %d stale upload staging file(s)", swept)
    return swept


def run_janitor(
    settings: Settings,
    interval_s: float | None = None,
    *,
    stop: threading.Event | None = None,
    db: Database | None = None,
    send: Sender | None = None,
    notify: NotifySender | None = None,
) -> None:
    """Run :func:`janitor_pass` every ``interval_s`` (default: ``settings.janitor_interval_s``) until ``stop``
    is set; a pass that cannot reach the DB is logged and the next one tries again.

    Args:
        send: how tasks are sent (default: Celery on the broker; tests pass a recorder).
        notify: how notification tasks are sent (the same).
    """
    interval = settings.janitor_interval_s if interval_s is None else interval_s
    stop = stop or threading.Event()
    db = db or Database(settings.database_url)
    dispatcher = Dispatcher(settings, db, send or celery_sender(settings))
    notify = notify or celery_notify_sender(settings)
    assert settings.storage_dir is not None  # filled in by Settings
    storage = LocalStorage(settings.storage_dir)
    log.info("janitor: every %.1f s on %s", interval, db.url)
    try:
        while not stop.is_set():
            try:
                janitor_pass(db, dispatcher)
                enqueue_notifications(db, notify)
            except JobDBError as exc:
                log.warning("janitor: pass failed: %s", exc)
            sweep_tmp(storage, settings.tmp_max_age_s)
            stop.wait(interval)
    finally:
        dispatcher.close()
