"""/v1/jobs: submit, dry run, caps, cancel, listing, SSE events, logs and artifacts; the real queue path."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from api_helpers import GOOD_SPEC, FakeDryRun, FakeQueue, Tokens, assert_error_body, bearer, upload
from flask import Flask
from flask.testing import FlaskClient

from core.settings import Settings
from service.app import create_app
from store import Database
from worker.queues import TRAIN_TASK


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _submit(client: FlaskClient, token: str, dataset_id: str, spec: Any = None, query: str = "") -> Any:
    return client.post(
        f"/v1/jobs{query}", json={"dataset": dataset_id, "spec": spec or GOOD_SPEC}, headers=bearer(token)
    )


def _db(app: Flask) -> Database:
    return app.extensions["gpuyard"].db


def test_submit_queues_the_job(client, tokens: Tokens, dataset_id: str, queue: FakeQueue) -> None:  # type: ignore[no-untyped-def]
    response = _submit(client, tokens.alice, dataset_id)
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert queue.sent == [job["id"]]
    assert response.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    assert (job["state"], job["owner"], job["dataset"], job["attempts"]) == ("queued", "alice", dataset_id, 0)
    assert job["spec"]["architecture"]["widths"] == [16]
    assert job["spec"]["training"]["batch_size"] == 32  # stored with its defaults filled in
    assert {
        "queued_at",
        "started_at",
        "finished_at",
        "progress",
        "error_reason",
        "error_detail",
        "gpu",
    } <= set(job)
    assert job["peak_gpu_memory_bytes"] is None
    assert client.get(f"/v1/jobs/{job['id']}", headers=bearer(tokens.alice)).get_json() == job


def test_a_bad_spec_lists_every_problem(client, tokens: Tokens, dataset_id: str, queue: FakeQueue) -> None:  # type: ignore[no-untyped-def]
    spec = {"architecture": {"family": "mlp", "widths": [-1]}, "training": {"epochs": 0}, "loss": "nope"}
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, spec), 422, "spec_invalid")
    fields = {p["field"] for p in body["problems"]}
    assert fields == {"spec.architecture.widths.0", "spec.training.epochs", "spec.loss"}
    assert all("Received" in p["detail"] for p in body["problems"])
    assert queue.sent == []


@pytest.mark.parametrize(
    ("spec_change", "error", "field"),
    [
        ({"architecture": {"family": "cnn"}}, "spec_invalid", "spec.architecture.family"),  # images only
        ({"output": {"units": 3}}, "spec_invalid", "spec.output.units"),
        ({"data": {"x_train": "NOPE"}}, "dataset_invalid", "NOPE"),  # checked again with the spec's keys
        ({"data": {"num_classes": 3}}, "dataset_invalid", "Y_train"),
    ],
)
def test_a_spec_that_does_not_fit_the_data_is_refused_at_submit(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, spec_change: dict, error: str, field: str
) -> None:
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, {**GOOD_SPEC, **spec_change}), 422, error)
    assert field in {p.get("field") for p in body["problems"]}, body
    assert queue.sent == []


def test_a_malformed_body_is_refused(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    assert_error_body(client.post("/v1/jobs", data="nope", headers=bearer(tokens.alice)), 400, "bad_request")
    body = assert_error_body(client.post("/v1/jobs", json={"spec": {}}, headers=bearer(tokens.alice)), 422)
    assert body["field"] == "dataset"


def test_unknown_dataset_is_404(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    body = assert_error_body(_submit(client, tokens.alice, "ds_nope"), 404, "not_found")
    assert body["field"] == "dataset"


def test_cap_on_active_jobs_is_429(client, tokens: Tokens, dataset_id: str, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    for _ in range(settings.max_active_jobs_per_user):
        assert _submit(client, tokens.alice, dataset_id).status_code == 201
    body = assert_error_body(_submit(client, tokens.alice, dataset_id), 429, "too_many_active_jobs")
    assert f"limit is {settings.max_active_jobs_per_user}" in body["detail"]


def test_dry_run_queues_nothing(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, dry_run: FakeDryRun
) -> None:
    response = _submit(client, tokens.alice, dataset_id, query="?dry_run=1")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["dry_run"] is True and body["report"]["parameters"] == 1234
    assert queue.sent == []
    assert client.get("/v1/jobs", headers=bearer(tokens.alice)).get_json()["jobs"] == []
    ((spec, data_path),) = dry_run.calls
    assert data_path.is_file() and spec["architecture"]["family"] == "mlp"
    assert_error_body(_submit(client, tokens.alice, dataset_id, query="?dry_run=maybe"), 422)


def test_a_failed_dry_run_is_422_with_its_errors(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, dry_run: FakeDryRun, queue: FakeQueue
) -> None:
    dry_run.report = {
        "ok": False,
        "errors": [{"code": "shape_mismatch", "detail": "too wide", "field": "output"}],
    }
    body = assert_error_body(
        _submit(client, tokens.alice, dataset_id, query="?dry_run=1"), 422, "spec_invalid"
    )
    assert body["problems"] == [{"code": "shape_mismatch", "detail": "too wide", "field": "spec.output"}]
    assert queue.sent == []


def test_cancel_a_queued_job(client, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(tokens.alice)).get_json()
    assert (job["state"], job["cancel_requested"], job["error_reason"]) == ("cancelled", True, "cancelled")
    assert job["finished_at"] is not None


def test_cancel_a_running_job_sets_the_flag(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    _db(app).take_lease(job_id, "w1", 60)
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(tokens.alice)).get_json()
    assert (job["state"], job["cancel_requested"]) == ("running", True)


def test_list_filters_and_pages(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    first = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    second = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    client.post(f"/v1/jobs/{first}/cancel", headers=bearer(tokens.alice))
    page = client.get("/v1/jobs?limit=1", headers=bearer(tokens.alice)).get_json()
    assert [j["id"] for j in page["jobs"]] == [second] and page["next_cursor"]
    page = client.get(
        f"/v1/jobs?limit=1&cursor={page['next_cursor']}", headers=bearer(tokens.alice)
    ).get_json()
    assert [j["id"] for j in page["jobs"]] == [first] and page["next_cursor"] is None
    queued = client.get("/v1/jobs?state=queued", headers=bearer(tokens.alice)).get_json()["jobs"]
    assert [j["id"] for j in queued] == [second]
    for query, field in (("limit=0", "limit"), ("state=bogus", "state"), ("cursor=xyz", "cursor")):
        body = assert_error_body(client.get(f"/v1/jobs?{query}", headers=bearer(tokens.alice)), 422)
        assert body["field"] == field


def test_queue_down_is_503_and_the_job_is_not_left_queued(  # type: ignore[no-untyped-def]
    client, app, tokens: Tokens, dataset_id: str, queue: FakeQueue
) -> None:
    queue.down = True
    assert_error_body(_submit(client, tokens.alice, dataset_id), 503, "queue_unavailable")
    (job,) = client.get("/v1/jobs", headers=bearer(tokens.alice)).get_json()["jobs"]
    assert (job["state"], job["error_reason"]) == ("interrupted", "queue_unavailable")


# ── artifacts and logs ──
def test_artifact_download_with_etag_and_range(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    storage = app.extensions["gpuyard"].storage
    content = bytes(range(256)) * 40
    storage.write_bytes(storage.job_key(job_id, "model.h5"), content)
    url = f"/v1/jobs/{job_id}/artifacts/model.h5"
    response = client.get(url, headers=bearer(tokens.alice))
    assert response.status_code == 200 and response.data == content
    etag = hashlib.sha256(content).hexdigest()
    assert response.headers["ETag"] == f'"{etag}"'
    assert "attachment" in response.headers["Content-Disposition"]
    not_modified = client.get(url, headers={**bearer(tokens.alice), "If-None-Match": f'"{etag}"'})
    assert not_modified.status_code == 304
    partial = client.get(url, headers={**bearer(tokens.alice), "Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.data == content[10:20]
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    assert_error_body(
        client.get(f"/v1/jobs/{job_id}/artifacts/history.json", headers=bearer(tokens.alice)), 404
    )
    assert_error_body(client.get(f"/v1/jobs/{job_id}/artifacts/..%2Fx", headers=bearer(tokens.alice)), 404)
    assert_error_body(client.get(f"/v1/jobs/{job_id}/artifacts/model.h5", headers=bearer(tokens.bob)), 404)


def test_logs(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    assert_error_body(client.get(f"/v1/jobs/{job_id}/logs", headers=bearer(tokens.alice)), 404)
    storage = app.extensions["gpuyard"].storage
    storage.write_bytes(storage.job_key(job_id, "trainer.log"), b"line 1\nline 2\n")
    response = client.get(f"/v1/jobs/{job_id}/logs", headers=bearer(tokens.alice))
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "line 1\nline 2\n"


# ── Server-Sent Events ──
def _parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            events.append(
                {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}
            )
    return events


def _finished_job_with_events(client: FlaskClient, app: Flask, token: str, dataset_id: str) -> str:
    db = _db(app)
    job_id = _submit(client, token, dataset_id).get_json()["id"]
    db.take_lease(job_id, "w1", 60)
    for epoch in range(3):
        db.append_event(job_id, {"event": "epoch_end", "epoch": epoch, "loss": 1.0 / (epoch + 1)})
    db.finish_job(job_id, "w1", "succeeded", exit_code=0)
    return job_id


def test_events_replay_and_resume(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    job_id = _finished_job_with_events(client, app, tokens.alice, dataset_id)
    url = f"/v1/jobs/{job_id}/events"
    response = client.get(url, headers=bearer(tokens.alice))
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = _parse_sse(response.get_data(as_text=True))
    names = [e["event"] for e in events]
    assert names == ["state", "state", "epoch_end", "epoch_end", "epoch_end", "state"]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert events[-1]["data"]["state"] == "succeeded"
    resumed = _parse_sse(
        client.get(url, headers={**bearer(tokens.alice), "Last-Event-ID": str(events[2]["id"])}).get_data(
            as_text=True
        )
    )
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]
    by_query = _parse_sse(
        client.get(f"{url}?last_event_id={events[-1]['id']}", headers=bearer(tokens.alice)).get_data(
            as_text=True
        )
    )
    assert by_query == []  # resumed past the terminal event: the stream ends at once
    for bad in ("x", "²", "99999999999999999999999"):  # not digits, a digit that is no number, past int64
        assert_error_body(client.get(url, headers={**bearer(tokens.alice), "Last-Event-ID": bad}), 422)


def test_events_stream_live_until_the_job_ends(client, app, tokens: Tokens, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    db = _db(app)
    job_id = _submit(client, tokens.alice, dataset_id).get_json()["id"]
    db.take_lease(job_id, "w1", 60)

    def worker() -> None:
        time.sleep(0.3)
        db.append_event(job_id, {"event": "epoch_end", "epoch": 0})
        time.sleep(0.2)
        db.finish_job(job_id, "w1", "failed", "out_of_memory", "too big", 5)

    thread = threading.Thread(target=worker)
    thread.start()
    response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(tokens.alice))
    events = _parse_sse(response.get_data(as_text=True))  # returns once the stream ends
    thread.join()
    assert [e["event"] for e in events][-2:] == ["epoch_end", "state"]
    assert events[-1]["data"]["state"] == "failed" and events[-1]["data"]["reason"] == "out_of_memory"


# ── the real queue and readiness, on a private Redis ──
def test_real_queue_sends_the_task_by_name(tmp_path: Path, redis_url: str, digits_h5: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, train_queue="gpuyard.test.jobs")
    app = create_app({"TESTING": True, "GPUYARD_SETTINGS": settings, "GPUYARD_DRY_RUNNER": FakeDryRun()})
    client = app.test_client()
    _, token = _db(app).create_user("alice")
    assert client.get("/v1/ready").status_code == 200
    dataset_id = upload(client, token, digits_h5).get_json()["id"]
    job_id = _submit(client, token, dataset_id).get_json()["id"]
    broker = redis.Redis.from_url(redis_url)
    try:
        (raw,) = broker.lrange(settings.train_queue, 0, -1)
        message = json.loads(raw)
        assert message["headers"]["task"] == TRAIN_TASK
        assert message["headers"]["argsrepr"] == repr([job_id])
    finally:
        broker.delete(settings.train_queue)
        broker.close()
        _db(app).dispose()


def test_ready_is_503_without_redis(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/v1/ready")
    assert response.status_code == 503
    body = response.get_json()
    assert (
        body["status"] == "unavailable"
        and body["checks"]["database"] == "ok"
        and body["checks"]["redis"] != "ok"
    )
