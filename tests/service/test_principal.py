"""One check of "may this principal act" for bearer token, session cookie and open event streams: a user
disabled (or whose token is rotated) loses the dashboard session at its next request and their open
streams within a few seconds."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, Tokens, bearer, upload
from flask import Flask
from flask.testing import FlaskClient

from core.names import HISTORY
from service.principal import Principal, acting_user, may_act
from service.streams import EventHub
from store import Database
from worker.relay import EventPublisher


def _db(app: Flask) -> Database:
    return app.extensions["gpuyard"].db


def _csrf(client: FlaskClient, path: str = "/ui/login") -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).get_data(as_text=True))
    assert match
    return match.group(1)


def _sign_in(client: FlaskClient, token: str) -> None:
    response = client.post("/ui/login", data={"token": token, "csrf_token": _csrf(client)})
    assert response.status_code == 302, response.get_data(as_text=True)


@pytest.fixture
def job_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    dataset_id = upload(client, tokens.alice, digits_h5).get_json()["id"]
    response = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": GOOD_SPEC}, headers=bearer(tokens.alice))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def test_may_act_needs_the_same_enabled_user_with_the_same_token(app: Flask, tokens: Tokens) -> None:
    db = _db(app)
    alice = db.user_for_token(tokens.alice)
    assert alice is not None
    principal = Principal.of_token(alice.id, tokens.alice)
    assert principal == Principal.of(alice) and may_act(alice, principal)
    assert not may_act(None, principal)
    assert not may_act(db.user_for_token(tokens.bob), principal)
    db.set_user_disabled("alice", True)
    assert acting_user(db, principal) is None
    db.set_user_disabled("alice", False)
    assert acting_user(db, principal) is not None
    db.rotate_token("alice")
    assert acting_user(db, principal) is None


@pytest.mark.parametrize("change", ["disable", "rotate"])
def test_a_session_ends_at_its_next_request_once_its_user_is_disabled_or_rotated(
    client: FlaskClient, app: Flask, tokens: Tokens, job_id: str, change: str
) -> None:
    _sign_in(client, tokens.alice)
    csrf = _csrf(client, "/ui/jobs")
    assert client.get("/ui/jobs").status_code == 200
    assert client.get("/v1/jobs").status_code == 200
    if change == "disable":
        _db(app).set_user_disabled("alice", True)
    else:
        _db(app).rotate_token("alice")

    page = client.get("/ui/jobs")
    assert page.status_code == 302 and page.headers["Location"].startswith("/ui/login")
    assert client.get("/v1/jobs").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}/artifacts/{HISTORY}").status_code == 401
    submit = client.post(
        "/v1/jobs",
        json={"dataset": "ds_x", "spec": GOOD_SPEC},
        headers={"X-CSRFToken": csrf},
    )
    assert submit.status_code == 401, submit.get_json()
    cancel = client.post(f"/v1/jobs/{job_id}/cancel", headers={"X-CSRFToken": csrf})
    assert cancel.status_code == 401
    assert not _db(app).get_job(job_id).cancel_requested  # type: ignore[union-attr]


def _follow(response: Any) -> tuple[threading.Thread, list[str], list[float]]:
    """Read a streamed response in a thread; the chunks read, and when it ended."""
    chunks: list[str] = []
    ended: list[float] = []

    def read() -> None:
        try:
            for chunk in response.response:
                chunks.append(chunk if isinstance(chunk, str) else chunk.decode())
        finally:
            ended.append(time.monotonic())
            response.close()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, chunks, ended


@pytest.mark.parametrize(("via", "change"), [("token", "disable"), ("token", "rotate"), ("cookie", "disable")])
def test_an_open_stream_ends_within_seconds_once_its_user_may_not_act(
    client: FlaskClient, app: Flask, tokens: Tokens, job_id: str, via: str, change: str
) -> None:
    db = _db(app)
    headers = bearer(tokens.alice) if via == "token" else {}
    if via == "cookie":
        _sign_in(client, tokens.alice)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=headers, buffered=False)
    assert response.status_code == 200
    thread, chunks, ended = _follow(response)
    deadline = time.monotonic() + 10
    while not any("event: state" in c for c in chunks):  # the job's first events came through
        assert time.monotonic() < deadline and not ended, chunks
        time.sleep(0.05)
    time.sleep(1.0)
    assert not ended, "the stream ended while its user could still act"

    changed_at = time.monotonic()
    if change == "disable":
        db.set_user_disabled("alice", True)
    else:
        db.rotate_token("alice")
    thread.join(15)
    assert ended, "the stream outlived its user's access"
    assert ended[0] - changed_at < 10
    db.append_event(job_id, {"event": "epoch_end", "epoch": 1})
    assert not any("epoch_end" in c for c in chunks)


@pytest.mark.parametrize("pubsub", [False, True], ids=["polling", "published"])
def test_a_stream_coalesces_batch_events_and_sends_every_other_event(
    client: FlaskClient, app: Flask, tokens: Tokens, job_id: str, pubsub: bool, request: pytest.FixtureRequest
) -> None:
    db = _db(app)
    publisher = None
    if pubsub:  # as a supervisor does: store each event, then publish it with its seq
        redis_url = request.getfixturevalue("redis_url")
        app.extensions["gpuyard"].hub = EventHub(redis_url, poll_s=0.05)
        publisher = EventPublisher(redis_url)
        real_append = db.append_event

        def append_event(job: str, event: dict[str, Any], **kwargs: Any) -> int:
            seq = real_append(job, event, **kwargs)
            publisher.publish(job, {"seq": seq, **event})  # type: ignore[union-attr]
            return seq

        db.append_event = append_event  # type: ignore[method-assign]
    reads: list[int] = []
    real_events_since = db.events_since

    def events_since(job: str, after: int = 0, **kwargs: Any) -> Any:
        reads.append(after)
        return real_events_since(job, after, **kwargs)

    db.events_since = events_since  # type: ignore[method-assign]
    response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(tokens.alice), buffered=False)
    thread, chunks, ended = _follow(response)
    started = time.monotonic()
    for step in range(100):  # 50 a second, far faster than a dashboard needs
        db.append_event(job_id, {"event": "batch", "epoch": 1, "step": step, "steps": 100})
        if step % 25 == 0:
            db.append_event(job_id, {"event": "health", "findings": [], "step": step})
        time.sleep(0.02)
    db.append_event(job_id, {"event": "epoch_end", "epoch": 1})
    db.request_cancel(job_id)  # queued: cancelled at once, the stream's terminal event
    thread.join(30)
    assert ended, "the stream did not end with its job"
    elapsed = time.monotonic() - started
    body = "".join(chunks)
    sent_batches = body.count("event: batch")
    reads_at_most = elapsed / app.extensions["gpuyard"].settings.sse_batch_interval_s + 2
    # a run of batch events is cut to its last: one per read, plus one before each of the 4 health events
    assert 1 <= sent_batches <= reads_at_most + 4, sent_batches
    assert '"step":99' in body  # the latest progress always arrives
    assert body.count("event: health") == 4 and "event: epoch_end" in body and '"state":"cancelled"' in body
    if publisher is not None:  # the published events came from the hub, not from a DB read per wake-up
        assert len(reads) <= 6, reads
        publisher.close()
        app.extensions["gpuyard"].hub.close()


def test_a_long_history_is_replayed_page_after_page(
    client: FlaskClient, app: Flask, tokens: Tokens, job_id: str
) -> None:
    db = _db(app)
    for epoch in range(1, 1201):  # more than one page of the job DB (500)
        db.append_event(job_id, {"event": "epoch_end", "epoch": epoch})
    db.request_cancel(job_id)
    started = time.monotonic()
    body = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(tokens.alice)).get_data(as_text=True)
    assert body.count("event: epoch_end") == 1200 and '"state":"cancelled"' in body
    assert time.monotonic() - started < 10  # pages follow each other, not one per keep-alive
