"""Sharing GPUs through the API: priority within the user's maximum, fair order across users, 'auto' budgets
learned from measured peaks, backends the workers run, a dry run that says where and when, queue events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from api_helpers import (
    GPU0,
    GPU1,
    MLP,
    FakeQueue,
    Tokens,
    _db,
    assert_error_body,
    bearer,
    free_port,
    register_two,
    upload,
)
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from cli.main import main
from core.settings import Settings, get_settings
from worker.gpus import GiB


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "gpuyard",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        max_active_jobs_per_user=20,
        validate_cpu_seconds=20,
        fake_gpus="2x16GiB",
    )


@pytest.fixture
def datasets(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> dict[str, str]:
    return {who: upload(client, getattr(tokens, who), digits_h5).get_json()["id"] for who in ("alice", "bob")}


def post(
    client: FlaskClient, token: str, dataset: str, *, priority: int | None = None, dry: bool = False, **res: Any
) -> Any:
    body: dict[str, Any] = {"dataset": dataset, "spec": {**MLP, "resources": res}}
    if priority is not None:
        body["priority"] = priority
    return client.post("/v1/jobs" + ("?dry_run=1" if dry else ""), json=body, headers=bearer(token))


def test_priority_is_capped_by_the_users_maximum_and_orders_the_queue(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats, online=(GPU0,))
    body = assert_error_body(post(client, tokens.alice, datasets["alice"], priority=1), 422, "priority_too_high")
    assert body["field"] == "priority" and "max_priority 0" in body["detail"]
    _db(app).set_max_priority("alice", 2)
    post(client, tokens.bob, datasets["bob"], memory_fraction=1.0)  # takes the only GPU
    late = post(client, tokens.bob, datasets["bob"], memory_fraction=0.5).get_json()
    urgent = post(client, tokens.alice, datasets["alice"], priority=2, memory_fraction=0.5).get_json()
    assert urgent["priority"] == 2
    late, urgent = (client.get(f"/v1/jobs/{j['id']}", headers=bearer(tokens.admin)).get_json() for j in (late, urgent))
    assert (urgent["queue_position"], late["queue_position"]) == (1, 2)
    assert urgent["waiting_reason"] == "gpu_full" and late["waiting_reason"] == "behind_earlier_job"


def test_fair_share_puts_a_colleagues_one_job_before_a_users_many(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats, online=(GPU0,))
    sweep = [post(client, tokens.alice, datasets["alice"], memory_fraction=0.5).get_json() for _ in range(6)]
    assert [j["gpu"] for j in sweep[:2]] == [GPU0, GPU0] and sweep[2]["gpu"] is None
    one = post(client, tokens.bob, datasets["bob"], memory_fraction=0.5).get_json()
    shown = client.get(f"/v1/jobs/{one['id']}", headers=bearer(tokens.bob)).get_json()
    assert shown["queue_position"] == 1  # alice holds the GPU; bob holds nothing: he goes first
    assert shown["estimated_start_at"] is not None


def test_auto_sizes_the_budget_from_the_estimate_and_measured_peaks(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats)
    # no mlp job has a measured peak yet: 'auto' stands for the quarter until one has
    first = post(client, tokens.alice, datasets["alice"], memory_fraction="auto").get_json()
    assert first["memory_fraction_auto"] is True and first["spec"]["resources"]["memory_fraction"] == 0.25
    # the job ran and peaked at 2 GiB (the watchdog's reading): the next mlp job learns from it
    db = _db(app)
    assert db.take_lease(first["id"], "w", 60, gpu=first["gpu"])
    assert db.finish_job(first["id"], "w", "succeeded", peak_gpu_memory_bytes=2 * GiB)
    second = post(client, tokens.alice, datasets["alice"], memory_fraction="auto").get_json()
    assert second["spec"]["resources"]["memory_fraction"] == 0.16  # 2 GiB × margin 1.25 of 16 GiB
    dry = post(client, tokens.alice, datasets["alice"], memory_fraction="auto", dry=True).get_json()
    assert "1 earlier mlp jobs" in dry["memory"] and dry["spec"]["resources"]["memory_fraction"] == 0.16
    bad = assert_error_body(post(client, tokens.alice, datasets["alice"], memory_fraction="lots"), 422)
    assert "memory_fraction" in bad["detail"]


def test_a_backend_no_worker_runs_is_refused_and_an_offline_one_waits(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats, online=(GPU0,))
    beats[GPU0]["backends"] = ["tensorflow"]
    db = _db(app)
    db.register_gpu(GPU0, host="node1", index=0, name="Fake", memory_total_bytes=16 * GiB, backends=["tensorflow"])
    body = assert_error_body(
        post(client, tokens.alice, datasets["alice"], backend="torch"), 422, "no_worker_for_backend"
    )
    assert body["field"] == "spec.resources.backend" and "tensorflow" in body["detail"]
    # GPU 1's worker (offline now) runs jax: a jax job is accepted and waits for it
    db.register_gpu(GPU1, host="node2", index=1, name="Fake", memory_total_bytes=16 * GiB, backends=["jax"])
    waiting = post(client, tokens.alice, datasets["alice"], backend="jax").get_json()
    assert waiting["gpu"] is None and waiting["waiting_reason"] == "no_worker_for_backend"
    assert "'jax'" in waiting["dispatch_note"] and waiting["estimated_start_at"] is None


def test_a_dry_run_says_where_and_when_it_would_start(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats, online=(GPU0,))
    now = post(client, tokens.alice, datasets["alice"], dry=True, memory_fraction=0.5).get_json()
    assert now["placement"]["gpu"] == GPU0 and now["placement"]["waiting_reason"] is None
    post(client, tokens.bob, datasets["bob"], memory_fraction=1.0)
    later = post(client, tokens.alice, datasets["alice"], dry=True, memory_fraction=0.5).get_json()["placement"]
    assert later["gpu"] is None and later["waiting_reason"] == "gpu_full" and later["queue_position"] == 1
    assert later["estimated_start_at"] is not None
    assert client.get("/v1/jobs", headers=bearer(tokens.alice)).get_json()["jobs"] == []  # nothing was queued


def test_a_waiting_job_records_queue_events_when_its_standing_changes(
    client: FlaskClient,
    app: Flask,
    tokens: Tokens,
    beats: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    queue: FakeQueue,
) -> None:
    register_two(app, beats, online=(GPU0,))
    post(client, tokens.bob, datasets["bob"], memory_fraction=1.0)
    mine = post(client, tokens.alice, datasets["alice"], memory_fraction=0.5).get_json()
    events = [e.event for e in _db(app).events_since(mine["id"])]
    assert [e["event"] for e in events] == ["state", "queue"]
    assert events[-1]["queue_position"] == 1 and events[-1]["waiting_reason"] == "gpu_full"
    # GPU 1 comes online; the next pass (any submit) places the job: no further queue event, a dispatch
    register_two(app, beats)
    post(client, tokens.bob, datasets["bob"], gpu="cpu")
    assert queue.queues[mine["id"]].startswith("gpu.")
    assert [e.event["event"] for e in _db(app).events_since(mine["id"])] == ["state", "queue"]


def test_the_cli_shows_the_queue_and_an_admin_sets_priorities(
    app: Flask,
    tokens: Tokens,
    beats: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    server_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    register_two(app, beats, online=(GPU0,))
    runner = CliRunner()

    def gpuyard(*args: str, token: str = tokens.alice) -> Any:
        argv = [*args, "--url", server_url, "--token", token]
        return runner.invoke(main, argv, catch_exceptions=False, env={"COLUMNS": "200"})

    monkeypatch.setenv("GPUYARD_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("GPUYARD_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()  # the admin commands read the process's settings once
    request.addfinalizer(get_settings.cache_clear)
    refused = runner.invoke(main, ["users", "set-priority", "nobody", "3"])
    assert refused.exit_code == 1 and "no user named 'nobody'" in refused.output
    assert runner.invoke(main, ["users", "set-priority", "alice", "3"]).exit_code == 0
    assert _db(app).get_user(_db(app).user_for_token(tokens.alice).id).max_priority == 3

    spec = Path(settings.data_dir) / "half.json"
    spec.write_text(json.dumps({**MLP, "resources": {"memory_fraction": 1.0}}))
    assert gpuyard("submit", str(spec), "--dataset", datasets["alice"]).exit_code == 0
    waiting = gpuyard("submit", str(spec), "--dataset", datasets["alice"], "--priority", "3")
    assert waiting.exit_code == 0 and "queue: #1, gpu_full, starts ~" in waiting.stderr
    job_id = waiting.stdout.strip()
    listed = gpuyard("status")
    assert "#1 gpu_full" in listed.stdout
    shown = gpuyard("status", job_id)
    assert "priority" in shown.stdout and "#1, gpu_full" in shown.stdout and "memory_fraction 1.0" in shown.stdout
