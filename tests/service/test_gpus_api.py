"""/v1/gpus and GPU placement through the API: states, jobs and foreign processes per GPU, admin-only
drain/undrain/clear, 422 for a job no GPU could ever hold, a waiting job's queue position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from api_helpers import (
    GPU0,
    GPU1,
    FakeQueue,
    Tokens,
    _db,
    assert_error_body,
    bearer,
    free_port,
    register_two,
    submit,
    upload,
)
from flask import Flask
from flask.testing import FlaskClient

from core.settings import Settings
from worker.gpus import GiB


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "gpuyard",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        max_upload_bytes=2 * 2**20,
        max_active_jobs_per_user=10,
        validate_cpu_seconds=20,
        fake_gpus="2x16GiB",
        gpu_reserve_fraction=0.1,
    )


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def test_gpus_need_a_token_and_list_every_registered_gpu(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]]
) -> None:
    assert_error_body(client.get("/v1/gpus"), 401, "unauthorized")
    assert client.get("/v1/gpus", headers=bearer(tokens.alice)).get_json() == {"gpus": []}
    register_two(app, beats, online=(GPU0,))
    beats[GPU0]["processes"] = [{"pid": 4242, "pgid": 4242, "memory_bytes": 3 * GiB, "gpuyard": False}]
    beats[GPU0]["foreign_bytes"] = 3 * GiB
    gpus = client.get("/v1/gpus", headers=bearer(tokens.alice)).get_json()["gpus"]
    assert [(g["uuid"], g["index"], g["host"], g["state"], g["online"]) for g in gpus] == [
        (GPU0, 0, "node1", "online", True),
        (GPU1, 1, "node1", "offline", False),
    ]
    assert gpus[0]["foreign_processes"] == [{"pid": 4242, "memory_bytes": 3 * GiB}]
    assert gpus[0]["memory_total_bytes"] == 16 * GiB and gpus[0]["slots"] == 4 and gpus[0]["jobs"] == []


def test_jobs_are_placed_on_gpus_and_shown_on_them(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], dataset_id: str, queue: FakeQueue
) -> None:
    register_two(app, beats, online=(GPU0,))
    first = submit(client, tokens.alice, dataset_id, memory_fraction=0.5).get_json()
    assert first["gpu"] == GPU0 and first["dispatched_at"] and first["queue_position"] is None
    assert queue.queues[first["id"]] == f"gpu.{GPU0}"
    # 0.5 + 0.5 > 1 − reserve (0.9): the second waits, and says where it is and why
    second = submit(client, tokens.alice, dataset_id, memory_fraction=0.5).get_json()
    third = submit(client, tokens.alice, dataset_id, memory_fraction=0.25).get_json()
    assert second["gpu"] is None and second["queue_position"] == 1 and "memory fraction free" in second["dispatch_note"]
    assert (second["waiting_reason"], third["waiting_reason"]) == ("gpu_full", "behind_earlier_job")
    assert third["queue_position"] == 2  # not overtaking on GPU 0
    assert second["estimated_start_at"] is not None and third["estimated_start_at"] >= second["estimated_start_at"]
    listed = {j["id"]: j for j in client.get("/v1/jobs", headers=bearer(tokens.alice)).get_json()["jobs"]}
    assert (listed[third["id"]]["queue_position"], listed[third["id"]]["waiting_reason"]) == (2, "behind_earlier_job")
    assert queue.sent == [first["id"]]
    shown = client.get(f"/v1/jobs/{second['id']}", headers=bearer(tokens.alice)).get_json()
    assert shown["queue_position"] == 1
    jobs = client.get("/v1/gpus", headers=bearer(tokens.alice)).get_json()["gpus"][0]["jobs"]
    assert [(j["id"], j["owner"], j["memory_fraction"], j["budget_bytes"]) for j in jobs] == [
        (first["id"], "alice", 0.5, 8 * GiB)
    ]
    # GPU 1 comes online: the waiting jobs go there at the next dispatch (a submit, a job end, the janitor)
    register_two(app, beats)
    fourth = submit(client, tokens.alice, dataset_id, gpu="cpu").get_json()
    assert queue.queues[fourth["id"]] == app.extensions["gpuyard"].settings.train_queue
    assert queue.queues[second["id"]] == f"gpu.{GPU1}"
    third = client.get(f"/v1/jobs/{third['id']}", headers=bearer(tokens.alice)).get_json()
    assert (third["gpu"], third["queue_position"], third["dispatch_note"]) == (GPU0, None, None)  # FIFO kept


def test_a_job_no_gpu_could_ever_hold_is_refused(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], dataset_id: str
) -> None:
    missing = "GPU-11111111-2222-3333-4444-555555555555"
    body = assert_error_body(submit(client, tokens.alice, dataset_id, gpu=missing), 422, "never_fits")
    assert body["field"] == "spec.resources.gpu" and missing in body["detail"]
    register_two(app, beats)
    body = assert_error_body(submit(client, tokens.alice, dataset_id, memory_fraction=0.95), 422, "never_fits")
    assert body["field"] == "spec.resources.memory_fraction" and "0.95" in body["detail"]
    assert submit(client, tokens.alice, dataset_id, gpu=GPU1, memory_fraction=0.9).status_code == 201


def test_no_gpus_registered_sends_any_job_to_the_cpu_queue(
    client: FlaskClient, app: Flask, tokens: Tokens, dataset_id: str, queue: FakeQueue
) -> None:
    job = submit(client, tokens.alice, dataset_id, memory_fraction=1.0).get_json()
    assert job["gpu"] == "cpu" and queue.queues[job["id"]] == app.extensions["gpuyard"].settings.train_queue


def test_drain_undrain_and_clear_are_for_admins(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], dataset_id: str
) -> None:
    register_two(app, beats)
    for action in ("drain", "undrain", "clear"):
        assert_error_body(client.post(f"/v1/gpus/{GPU0}/{action}", headers=bearer(tokens.alice)), 403, "forbidden")
    assert_error_body(client.post("/v1/gpus/GPU-nope/drain", headers=bearer(tokens.admin)), 404)

    drained = client.post(f"/v1/gpus/{GPU0}/drain", headers=bearer(tokens.admin)).get_json()
    assert drained["state"] == "draining" and drained["draining_since"]
    client.post(f"/v1/gpus/{GPU1}/drain", headers=bearer(tokens.admin))
    waiting = submit(client, tokens.alice, dataset_id, memory_fraction=0.5).get_json()
    assert waiting["gpu"] is None and "draining" in waiting["dispatch_note"]
    assert client.post(f"/v1/gpus/{GPU0}/undrain", headers=bearer(tokens.admin)).get_json()["state"] == "online"
    assert _db(app).get_job(waiting["id"]).gpu == GPU0  # undrain dispatches at once

    _db(app).quarantine_gpu(GPU1, "after job x: 900 MiB held by no process")
    _db(app).set_gpu_draining(GPU1, False)
    shown = client.get("/v1/gpus", headers=bearer(tokens.alice)).get_json()["gpus"][1]
    assert shown["state"] == "quarantined" and "900 MiB" in shown["quarantine_reason"]
    cleared = client.post(f"/v1/gpus/{GPU1}/clear", headers=bearer(tokens.admin)).get_json()
    assert cleared["state"] == "online" and cleared["quarantine_reason"] is None


def test_a_non_admin_sees_other_users_jobs_only_as_anonymous_usage(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], digits_h5: Path
) -> None:
    register_two(app, beats, online=(GPU0,))
    alices = submit(
        client, tokens.alice, upload(client, tokens.alice, digits_h5).get_json()["id"], memory_fraction=0.25
    )
    bobs = submit(client, tokens.bob, upload(client, tokens.bob, digits_h5).get_json()["id"], memory_fraction=0.5)
    alice_job, bob_job = alices.get_json()["id"], bobs.get_json()["id"]

    def seen_by(token: str) -> list[tuple[Any, Any, float]]:
        response = client.get("/v1/gpus", headers=bearer(token))
        jobs = response.get_json()["gpus"][0]["jobs"]
        return sorted(((j["id"], j["owner"], j["memory_fraction"]) for j in jobs), key=lambda t: t[2])

    assert seen_by(tokens.alice) == [(alice_job, "alice", 0.25), (None, None, 0.5)]
    assert seen_by(tokens.bob) == [(None, None, 0.25), (bob_job, "bob", 0.5)]
    assert seen_by(tokens.admin) == [(alice_job, "alice", 0.25), (bob_job, "bob", 0.5)]
    text = client.get("/v1/gpus", headers=bearer(tokens.alice)).get_data(as_text=True)
    assert bob_job not in text and "bob" not in text
