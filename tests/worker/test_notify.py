"""Notifications when a job ends: the outbox flag, the signed webhook on a loopback receiver, a dead receiver.

A loopback HTTP server records the POSTs it gets. The task's logic (``worker.notify.deliver``) runs
directly, and once through a real ``celery worker`` with the fake trainer (no Keras).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery_helpers import WorkerProcess, wait_for

from core.settings import Settings
from core.states import CANCELLED, INTERRUPTED, SUCCEEDED
from store import Database
from worker.dispatch import Dispatcher
from worker.errors import QueueUnavailable
from worker.janitor import janitor_pass
from worker.notify import (
    SIGNATURE_HEADER,
    NotifyFailed,
    NotifyRefused,
    deliver,
    enqueue_notifications,
    url_problems,
)
from worker.queues import celery_notify_sender, celery_sender

FAKE_TRAINER = f"{sys.executable} {Path(__file__).with_name('fake_trainer.py')}"
LOOPBACK = "127.0.0.0/8"


@dataclass
class Receiver:
    """A webhook receiver on loopback; ``status`` is what it answers."""

    url: str
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    status: int = 204


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hook"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (the port was bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def fake_spec(**fake: object) -> dict[str, object]:
    return {"name": "fake", "fake": fake, "resources": {"gpu": "cpu"}}


def make_notifying_job(db: Database, make_job: Callable[..., str], notify: list[str] | None) -> str:
    """A fake-trainer job on the test's data set whose notify list is ``notify`` (None: its owner's)."""
    sibling = db.get_job(make_job(fake_spec(epochs=1)))
    db.request_cancel(sibling.id)
    db.claim_notifications()  # the sibling's own end is not what the tests count
    job = db.create_job(
        sibling.owner_id, sibling.dataset_id, fake_spec(epochs=1), max_active=100, max_attempts=3, notify=notify
    )
    return job.id


def verify(headers: dict[str, str], body: bytes, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers[SIGNATURE_HEADER.lower()], expected)


# ── what a user may name ──────────────────────────────────────────────────────────────────────────────
def test_url_problems_name_the_field_and_what_is_expected(settings: Settings) -> None:
    good = ["https://hooks.example.com/x", "http://10.1.2.3:8080/h", "slack://T1/B1/C1", "mailto://u:p@example.com"]
    assert url_problems(good, settings) == []
    problems = url_problems(["ftp://example.com/x", "json://example.com", "http:///nohost", "x" * 3000], settings)
    assert [p.field for p in problems] == ["notify[0]", "notify[1]", "notify[2]", "notify[3]"]
    assert all(p.code == "invalid_url" and "Expected" in p.detail for p in problems)
    too_many = url_problems(["https://example.com/"] * (settings.notify_max_urls + 1), settings)
    assert too_many[0].code == "too_many_urls" and too_many[0].field == "notify"


# ── the outbox: one claim per terminal transition ─────────────────────────────────────────────────────
def test_every_terminal_transition_is_claimed_once(
    settings: Settings, db: Database, make_job: Callable[..., str]
) -> None:
    cancelled = make_notifying_job(db, make_job, ["https://example.com/a", "https://example.com/b"])
    interrupted = make_notifying_job(db, make_job, None)  # its owner's defaults
    silent = make_notifying_job(db, make_job, [])
    owner = db.get_job(interrupted).owner_id
    db.set_user_notify(owner, ["https://example.com/default"])
    still_queued = make_notifying_job(db, make_job, ["https://example.com/q"])

    assert db.request_cancel(cancelled).state == CANCELLED
    assert db.interrupt_queued(interrupted, "queue_unavailable", "test")
    db.request_cancel(silent)
    sent: list[tuple[str, str]] = []

    assert enqueue_notifications(db, lambda job_id, url: sent.append((job_id, url))) == 3
    assert sorted(sent) == sorted(
        [
            (cancelled, "https://example.com/a"),
            (cancelled, "https://example.com/b"),
            (interrupted, "https://example.com/default"),
        ]
    )
    assert db.get_job(interrupted).state == INTERRUPTED
    assert enqueue_notifications(db, lambda job_id, url: sent.append((job_id, url))) == 0  # claimed once
    assert still_queued not in {job_id for job_id, _ in sent}


def test_a_queue_that_is_down_leaves_the_notifications_pending(
    settings: Settings, db: Database, make_job: Callable[..., str]
) -> None:
    job_id = make_notifying_job(db, make_job, ["https://example.com/a"])
    db.request_cancel(job_id)

    def down(job_id: str, url: str) -> None:
        raise QueueUnavailable("the broker is down")

    assert enqueue_notifications(db, down) == 0
    sent: list[tuple[str, str]] = []
    assert enqueue_notifications(db, lambda job_id, url: sent.append((job_id, url))) == 1
    assert sent == [(job_id, "https://example.com/a")]


# ── the task's logic, called directly ─────────────────────────────────────────────────────────────────
def test_webhook_is_one_signed_json_post(
    settings: Settings, db: Database, make_job: Callable[..., str], receiver: Receiver
) -> None:
    settings = settings.model_copy(update={"notify_allowed_networks": LOOPBACK})
    job_id = make_notifying_job(db, make_job, [receiver.url])
    db.request_cancel(job_id)
    secret = db.rotate_webhook_secret(db.get_job(job_id).owner_id)
    assert secret is not None

    assert deliver(job_id, receiver.url, settings, db) == "webhook answered 204"

    ((headers, body),) = receiver.posts
    assert headers["content-type"] == "application/json"
    assert verify(headers, body, secret)
    assert not verify(headers, body + b" ", secret)
    payload = json.loads(body)
    assert payload["job_id"] == job_id and payload["state"] == CANCELLED and payload["reason"] == "cancelled"
    assert payload["user"] == db.get_job(job_id).owner.name and payload["finished_at"]
    assert payload["links"]["job"].endswith(f"/v1/jobs/{job_id}")


def test_webhook_to_loopback_is_refused_without_the_allow_list(
    settings: Settings, db: Database, make_job: Callable[..., str], receiver: Receiver
) -> None:
    job_id = make_notifying_job(db, make_job, [receiver.url])
    db.request_cancel(job_id)
    with pytest.raises(NotifyRefused, match="internal address"):
        deliver(job_id, receiver.url, settings, db)
    assert receiver.posts == []


def test_receiver_errors_are_retried_or_dropped(
    settings: Settings, db: Database, make_job: Callable[..., str], receiver: Receiver, dead_url: str
) -> None:
    settings = settings.model_copy(update={"notify_allowed_networks": LOOPBACK, "notify_timeout_s": 2})
    job_id = make_notifying_job(db, make_job, [receiver.url])
    db.request_cancel(job_id)
    with pytest.raises(NotifyFailed):  # nothing listens: worth a retry
        deliver(job_id, dead_url, settings, db)
    receiver.status = 503
    with pytest.raises(NotifyFailed):
        deliver(job_id, receiver.url, settings, db)
    receiver.status = 404
    with pytest.raises(NotifyRefused):
        deliver(job_id, receiver.url, settings, db)


# ── through a real Celery worker ──────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_a_worker_posts_once_per_finished_job_and_a_dead_receiver_changes_nothing(
    settings: Settings,
    db: Database,
    make_job: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    receiver: Receiver,
    dead_url: str,
) -> None:
    """About 15 s: two fake-trainer jobs through one worker that also consumes the notify queue."""
    settings = settings.model_copy(
        update={
            "trainer_command": FAKE_TRAINER,
            "notify_queue": settings.train_queue,  # the test worker consumes one queue
            "notify_allowed_networks": LOOPBACK,
            "notify_max_retries": 1,
        }
    )
    worker = start_worker(settings, concurrency=2)
    heard = make_notifying_job(db, make_job, [receiver.url])
    unheard = make_notifying_job(db, make_job, [dead_url])
    secret = db.rotate_webhook_secret(db.get_job(heard).owner_id)
    assert secret is not None
    dispatcher = Dispatcher(settings, db, celery_sender(settings))
    try:
        dispatcher.run()
        wait_for(lambda: all(db.get_job(j).is_terminal for j in (heard, unheard)), 120, "both jobs to end")
        assert db.get_job(heard).state == SUCCEEDED
        assert db.get_job(unheard).state == SUCCEEDED  # a receiver that never answers changes nothing
        wait_for(lambda: receiver.posts, 60, "the webhook POST")
        # The dead receiver's task is retried, then dropped; the live one got exactly one POST.
        wait_for(lambda: "notification dropped after 1 retries" in worker.log(), 60, "the dead URL's last retry")
        janitor_pass(db, dispatcher)
        assert enqueue_notifications(db, celery_notify_sender(settings)) == 0  # nothing left pending
    finally:
        dispatcher.close()
    ((headers, body),) = receiver.posts
    assert verify(headers, body, secret) and json.loads(body)["job_id"] == heard
    assert json.loads(body)["state"] == SUCCEEDED
