"""Notifications when a job ends: the outbox flag, the signed webhook on a loopback receiver, a dead receiver.

A loopback HTTP server records the POSTs it gets. The task's logic (``worker.notify.deliver``) runs
directly, and once through a real ``celery worker`` with the fake trainer (no Keras).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
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
    AddressRefused,
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
PUBLIC = "93.184.215.14"  # what the fake DNS answers for a "public" name


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An in-process resolver: names in the returned table resolve to its addresses (a callable's answer,
    for one that changes), IP literals to themselves, anything else fails as an unknown name."""
    table: dict[str, Any] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in table:
            answer = table[name]() if callable(table[name]) else table[name]
            port_number = int(port or 0)
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port_number))
                for a in answer
            ]
        if name.replace(".", "").isdigit() or ":" in name:
            return real(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def test_url_problems_name_the_field_and_what_is_expected(settings: Settings, fake_dns: dict[str, Any]) -> None:
    fake_dns.update({"hooks.example.com": [PUBLIC], "example.com": [PUBLIC]})
    good = [
        "https://hooks.example.com/x",
        "http://93.184.215.14:8080/h",
        "slack://T1/B1/C1",
        "mailto://u:p@example.com",
    ]
    assert url_problems([*good, "https://not-yet.example.org/h"], settings) == []  # unresolved: checked at send
    problems = url_problems(["ftp://example.com/x", "json://example.com", "http:///nohost", "x" * 3000], settings)
    assert [p.field for p in problems] == ["notify[0]", "notify[1]", "notify[2]", "notify[3]"]
    assert all(p.code == "invalid_url" and "Expected" in p.detail for p in problems)
    too_many = url_problems(["https://example.com/"] * (settings.notify_max_urls + 1), settings)
    assert too_many[0].code == "too_many_urls" and too_many[0].field == "notify"
    (local,) = url_problems(["syslog://"], settings)  # a notification on the worker's own host
    assert local.code == "invalid_url" and "worker's own host" in local.detail


INTERNAL = [
    ("gotify://127.0.0.1:9/x", "gotify://127.0.0.1:9/…", "127.0.0.1, a loopback address"),
    ("http://0x7f000001/", "http://0x7f000001/…", "127.0.0.1, a loopback address"),
    ("http://2130706433/hook", "http://2130706433/…", "127.0.0.1, a loopback address"),
    ("http://127.1/", "http://127.1/…", "127.0.0.1, a loopback address"),
    ("https://[::ffff:127.0.0.1]/h", "https://[::ffff:127.0.0.1]/…", "(IPv4 127.0.0.1), a loopback address"),
    ("http://[::1]:8080/h", "http://[::1]:8080/…", "::1, a loopback address"),
    ("http://localhost./h", "http://localhost./…", "127.0.0.1, a loopback address"),
    ("http://api.localhost/h", "http://api.localhost/…", "127.0.0.1, a loopback address"),
    ("http://0.0.0.0:8000/", "http://0.0.0.0:8000/…", "0.0.0.0, the unspecified address"),
    ("http://[::]/", "http://[::]/…", ":: , the unspecified address".replace(" ,", ",")),
    ("http://169.254.169.254/latest/meta-data", "http://169.254.169.254/…", "169.254.169.254, a link-local address"),
    ("http://[fe80::1]/", "http://[fe80::1]/…", "fe80::1, a link-local address"),
    ("http://10.1.2.3:8080/h", "http://10.1.2.3:8080/…", "10.1.2.3, a private address"),
    ("https://192.168.0.10/h", "https://192.168.0.10/…", "192.168.0.10, a private address"),
    ("http://[fd00::1]/", "http://[fd00::1]/…", "fd00::1, a private address"),
    ("http://100.64.0.1/", "http://100.64.0.1/…", "100.64.0.1, a non-public address"),
    ("http://224.0.0.1/", "http://224.0.0.1/…", "224.0.0.1, a multicast address"),
    ("ntfy://127.0.0.1/topic", "ntfy://127.0.0.1/…", "127.0.0.1, a loopback address"),
    ("mmost://127.0.0.1:8065/token", "mmost://127.0.0.1:8065/…", "a loopback address"),
    ("rocket://user:pass@127.0.0.1/room", "rocket://127.0.0.1/…", "a loopback address"),
    ("matrix://user:pass@[::1]/#room", "matrix://[::1]/…", "::1, a loopback address"),
    ("kodi://10.0.0.5", "kodi://10.0.0.5/…", "a private address"),
    ("ncloud://user:pass@192.168.1.1/admin", "ncloud://192.168.1.1/…", "a private address"),
    ("signal://127.0.0.1:8080/+15551234567", "signal://127.0.0.1:8080/…", "a loopback address"),
    ("bark://127.0.0.1/device", "bark://127.0.0.1/…", "a loopback address"),
    ("lametric://apikey@127.0.0.1", "lametric://127.0.0.1/…", "a loopback address"),
    ("apprise://127.0.0.1/token", "apprise://127.0.0.1/…", "a loopback address"),
    ("mailto://user:pass@example.com?smtp=10.0.0.1", "mailto://example.com/…", "10.0.0.1, a private address"),
]


@pytest.mark.parametrize(("url", "shown", "why"), INTERNAL, ids=[u for u, _, _ in INTERNAL])
def test_every_scheme_with_a_host_is_refused_at_an_internal_address(
    settings: Settings, fake_dns: dict[str, Any], url: str, shown: str, why: str
) -> None:
    fake_dns["example.com"] = [PUBLIC]
    (problem,) = url_problems([url], settings)
    assert problem.code == "address_refused" and problem.field == "notify[0]"
    assert problem.detail.startswith(f"{shown} resolves to ") and why in problem.detail, problem.detail
    assert problem.detail.endswith("allowed: public addresses or GPUYARD_NOTIFY_ALLOWED_NETWORKS")
    assert "pass" not in problem.detail and "token" not in problem.detail  # secrets are not repeated


def test_a_public_looking_name_that_resolves_inside_is_refused(settings: Settings, fake_dns: dict[str, Any]) -> None:
    fake_dns.update({"hooks.attacker.example": [PUBLIC, "127.0.0.1"], "chat.attacker.example": ["10.9.8.7"]})
    problems = url_problems(
        [
            "https://hooks.attacker.example/h",
            "gotify://chat.attacker.example/token",
            "mailto://u:p@chat.attacker.example",
        ],
        settings,
    )
    assert [(p.field, p.code) for p in problems] == [(f"notify[{i}]", "address_refused") for i in range(3)]
    assert "hooks.attacker.example/… resolves to 127.0.0.1, a loopback address" in problems[0].detail
    assert "resolves to 10.9.8.7, a private address" in problems[1].detail


def test_the_allowed_networks_let_an_internal_receiver_through(settings: Settings) -> None:
    urls = ["http://127.0.0.1:9/hook", "gotify://127.0.0.1:9/x", "http://[::ffff:127.0.0.1]/", "http://localhost/"]
    assert len(url_problems(urls, settings)) == 4
    allowed = settings.model_copy(update={"notify_allowed_networks": LOOPBACK})
    assert url_problems(urls, allowed) == []
    assert len(url_problems(["http://10.0.0.1/"], allowed)) == 1  # only what is listed


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
    with pytest.raises(NotifyRefused, match="a loopback address"):
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


def test_internal_targets_stored_earlier_are_refused_when_sending(
    settings: Settings, db: Database, make_job: Callable[..., str], receiver: Receiver
) -> None:
    """A URL stored before the check existed (or by a looser version) is checked again by the notify task."""
    port = receiver.url.split(":")[2].split("/")[0]
    for url in (f"gotify://127.0.0.1:{port}/token", f"http://0x7f000001:{port}/hook"):
        job_id = make_notifying_job(db, make_job, [url])
        db.request_cancel(job_id)
        with pytest.raises(AddressRefused, match="a loopback address"):
            deliver(job_id, url, settings, db)
    assert receiver.posts == []


@pytest.mark.parametrize("scheme", ["http", "gotify"])
def test_a_name_that_changes_its_answer_after_the_check_is_refused_at_connect(
    settings: Settings,
    db: Database,
    make_job: Callable[..., str],
    receiver: Receiver,
    fake_dns: dict[str, Any],
    scheme: str,
) -> None:
    """DNS rebinding: the check sees a public address, the sender's own lookup gets loopback; the guard
    checks the address actually connected to, for webhooks and apprise alike."""
    answers = iter([[PUBLIC]])
    fake_dns["rebind.example"] = lambda: next(answers, ["127.0.0.1"])
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"{scheme}://rebind.example:{port}/hook"
    job_id = make_notifying_job(db, make_job, [url])
    db.request_cancel(job_id)
    with pytest.raises(AddressRefused, match=re.escape("rebind.example resolves to 127.0.0.1, a loopback address")):
        deliver(job_id, url, settings, db)
    assert receiver.posts == []
    assert socket.getaddrinfo is not None and "guard" not in socket.getaddrinfo.__name__  # removed after the send


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
