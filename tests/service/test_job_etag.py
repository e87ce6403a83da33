"""GET /v1/jobs/<id> and GET /v1/jobs answer with an ETag; If-None-Match gives 304 until the job changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_helpers import GOOD_SPEC, Tokens, bearer, upload
from flask import Flask
from flask.testing import FlaskClient

from service.schemas import JobOut
from store import Database


@pytest.fixture
def job_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    dataset = upload(client, tokens.alice, digits_h5).get_json()["id"]
    response = client.post("/v1/jobs", json={"dataset": dataset, "spec": GOOD_SPEC}, headers=bearer(tokens.alice))
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def _db(app: Flask) -> Database:
    return app.extensions["gpuyard"].db


def test_a_poller_gets_304_until_the_job_changes(client: FlaskClient, app: Flask, tokens: Tokens, job_id: str) -> None:
    first = client.get(f"/v1/jobs/{job_id}", headers=bearer(tokens.alice))
    etag = first.headers["ETag"]
    assert first.status_code == 200 and etag.startswith('"')

    again = client.get(f"/v1/jobs/{job_id}", headers={**bearer(tokens.alice), "If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag

    assert _db(app).request_cancel(job_id) is not None  # a queued job is cancelled at once
    changed = client.get(f"/v1/jobs/{job_id}", headers={**bearer(tokens.alice), "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert changed.get_json()["state"] == "cancelled"


def test_the_etag_does_not_leak_another_users_job(client: FlaskClient, tokens: Tokens, job_id: str) -> None:
    etag = client.get(f"/v1/jobs/{job_id}", headers=bearer(tokens.alice)).headers["ETag"]
    other = client.get(f"/v1/jobs/{job_id}", headers={**bearer(tokens.bob), "If-None-Match": etag})
    assert other.status_code == 404


def test_the_job_list_is_conditional_too(client: FlaskClient, app: Flask, tokens: Tokens, job_id: str) -> None:
    first = client.get("/v1/jobs", headers=bearer(tokens.alice))
    etag = first.headers["ETag"]
    assert client.get("/v1/jobs", headers={**bearer(tokens.alice), "If-None-Match": etag}).status_code == 304
    assert _db(app).request_cancel(job_id) is not None
    assert client.get("/v1/jobs", headers={**bearer(tokens.alice), "If-None-Match": etag}).status_code == 200


def test_read_job_shows_what_get_job_shows(app: Flask, tokens: Tokens, job_id: str) -> None:
    db = _db(app)
    alice = db.user_for_token(tokens.alice)
    bob = db.user_for_token(tokens.bob)
    assert alice is not None and bob is not None
    loaded, read = db.get_job(job_id, alice.id), db.read_job(job_id, alice.id)
    assert loaded is not None and read is not None
    assert JobOut.of(read) == JobOut.of(loaded) and read.owner.name == "alice"
    assert db.read_job(job_id, bob.id) is None and db.read_job("job_missing") is None
    admin_view = db.read_job(job_id)
    assert admin_view is not None and admin_view.owner.name == "alice"
