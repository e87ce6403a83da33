"""Error bodies: JSON from the app for odd paths and big headers, Retry-After on 429, no server paths;
documented content types for events and artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_helpers import GOOD_SPEC, Tokens, assert_error_body, bearer, upload
from flask import Flask
from flask.testing import FlaskClient

from core.names import ARTIFACT_MEDIA_TYPES, SUMMARY
from service.app import MAX_HEADER_FIELD_BYTES, MAX_HEADER_FIELDS
from service.errors import scrub_paths


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _services(app: Flask):  # type: ignore[no-untyped-def]
    return app.extensions["gpuyard"]


def test_every_429_carries_retry_after(client: FlaskClient, tokens: Tokens, dataset_id: str) -> None:
    body = {"dataset": dataset_id, "spec": GOOD_SPEC}
    for _ in range(2):  # the fixture's cap: 2 active jobs per user
        assert client.post("/v1/jobs", json=body, headers=bearer(tokens.alice)).status_code == 201
    refused = client.post("/v1/jobs", json=body, headers=bearer(tokens.alice))
    assert_error_body(refused, 429, "too_many_active_jobs")
    assert int(refused.headers["Retry-After"]) > 0
    documented = client.get("/openapi.json").get_json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "Retry-After" in documented["429"]["headers"] and "431" in documented


@pytest.mark.parametrize("path", ["/v1/jobs//abc", "/v1/datasets//abc", "//v1/health", "/v1/jobs/a/b/c"])
def test_ids_with_slashes_get_a_json_404_not_a_redirect(client: FlaskClient, tokens: Tokens, path: str) -> None:
    assert_error_body(client.get(path, headers=bearer(tokens.alice)), 404, "not_found")


def test_oversized_headers_get_a_json_431(client: FlaskClient, tokens: Tokens) -> None:
    big = {"X-Big": "a" * (MAX_HEADER_FIELD_BYTES + 1), **bearer(tokens.alice)}
    body = assert_error_body(client.get("/v1/health", headers=big), 431, "request_header_fields_too_large")
    assert "X-Big" in body["detail"] and str(MAX_HEADER_FIELD_BYTES) in body["detail"]
    many = {f"X-H{i}": "1" for i in range(MAX_HEADER_FIELDS + 1)}
    assert_error_body(client.get("/v1/health", headers=many), 431, "request_header_fields_too_large")
    assert client.get("/v1/health", headers={"X-Ok": "a" * 4000}).status_code == 200


def test_details_name_no_server_path(app: Flask, client: FlaskClient, tokens: Tokens, dataset_id: str) -> None:
    svc = _services(app)
    dataset = svc.db.get_dataset(dataset_id)
    stored = svc.storage.local_path(dataset.storage_key)
    stored.unlink()  # the shared file is gone; a spec with other keys has it checked again
    spec = {**GOOD_SPEC, "data": {"num_classes": 10}}
    response = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": spec}, headers=bearer(tokens.alice))
    text = response.get_data(as_text=True)
    assert 400 <= response.status_code < 500, text
    assert stored.name in text
    assert str(svc.settings.data_dir) not in text and str(stored.parent) not in text


def test_scrub_paths_cuts_paths_under_the_roots_to_their_name() -> None:
    text = "'/srv/gy/storage/datasets/ab/x.h5' failed; see /tmp/gpuyard-dryrun-1/spec.json, not /v1/jobs"
    assert scrub_paths(text, ["/srv/gy/storage", "/tmp"]) == "'x.h5' failed; see spec.json, not /v1/jobs"


def test_events_answer_text_event_stream(client: FlaskClient, tokens: Tokens, dataset_id: str) -> None:
    job = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": GOOD_SPEC}, headers=bearer(tokens.alice))
    job_id = job.get_json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(tokens.alice))  # queued → cancelled: the stream ends
    response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(tokens.alice))
    assert response.headers["Content-Type"] == "text/event-stream"
    documented = client.get("/openapi.json").get_json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert list(documented["responses"]["200"]["content"]) == ["text/event-stream"]


def test_artifacts_download_with_their_documented_media_type(
    app: Flask, client: FlaskClient, tokens: Tokens, dataset_id: str
) -> None:
    job = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": GOOD_SPEC}, headers=bearer(tokens.alice))
    job_id = job.get_json()["id"]
    storage = _services(app).storage
    storage.write_bytes(storage.job_key(job_id, SUMMARY), json.dumps({"ok": True}).encode())
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{SUMMARY}", headers=bearer(tokens.alice))
    assert response.status_code == 200 and response.mimetype == "application/json"
    documented = client.get("/openapi.json").get_json()["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    assert set(documented["responses"]["200"]["content"]) == set(ARTIFACT_MEDIA_TYPES.values())


def test_a_jobs_error_detail_names_no_server_path(
    app: Flask, client: FlaskClient, tokens: Tokens, dataset_id: str
) -> None:
    svc = _services(app)
    job_id = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": GOOD_SPEC}, headers=bearer(tokens.alice))
    job_id = job_id.get_json()["id"]
    stored = svc.storage.local_path(svc.db.get_dataset(dataset_id).storage_key)
    assert svc.db.interrupt_queued(job_id, "dataset_invalid", f"{stored} does not exist")
    shown = client.get(f"/v1/jobs/{job_id}", headers=bearer(tokens.alice)).get_json()
    assert shown["error_detail"] == f"{stored.name} does not exist"
    listed = client.get("/v1/jobs", headers=bearer(tokens.alice)).get_json()["jobs"]
    assert [j["error_detail"] for j in listed if j["id"] == job_id] == [f"{stored.name} does not exist"]
