"""Usage accounting and quotas through the API: GET /v1/usage by user, day and GPU from the recorded
attempts, /metrics counters, GET /v1/users/me's quota, `gpuyard usage --csv`, and over_quota in the queue."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GPU0, MLP, Tokens, _db, assert_error_body, bearer, register_two, upload
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from cli.main import main
from core.settings import Settings, get_settings
from store import Database

T0 = dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC)  # an hour before midnight: usage by day splits


@pytest.fixture
def datasets(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> dict[str, str]:
    return {who: upload(client, getattr(tokens, who), digits_h5).get_json()["id"] for who in ("alice", "bob")}


def post(client: FlaskClient, token: str, dataset: str, fraction: float) -> dict[str, Any]:
    body = {"dataset": dataset, "spec": {**MLP, "resources": {"memory_fraction": fraction}}}
    response = client.post("/v1/jobs", json=body, headers=bearer(token))
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def ran(db: Database, job: dict[str, Any], start: dt.datetime, hours: float) -> str:
    """The job ran where it was dispatched from ``start`` for ``hours`` (lease, then finish, at those times)."""
    assert job["gpu"] is not None
    assert db.take_lease(job["id"], "w", 60, gpu=job["gpu"], now=start) is not None
    assert db.finish_job(job["id"], "w", "succeeded", now=start + dt.timedelta(hours=hours))
    return job["gpu"]


@pytest.fixture
def history(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> Database:
    """alice: 0.5 of GPU 0 for 2 h from T0 (3600 GPU-s); bob: all of GPU 1 for half an hour (1800 GPU-s)."""
    register_two(app, beats)
    db = _db(app)
    on = ran(db, post(client, tokens.alice, datasets["alice"], 0.5), T0, 2)
    bob_job = post(client, tokens.bob, datasets["bob"], 1.0)
    ran(db, bob_job, T0, 0.5)
    app.config["TEST_GPUS"] = (on, bob_job["gpu"])
    return db


def usage(client: FlaskClient, token: str, group_by: str = "user") -> dict[str, float]:
    window = {"from": "2026-11-01T00:00:00Z", "to": "2026-12-02T00:00:00Z", "group_by": group_by}
    response = client.get("/v1/usage", query_string=window, headers=bearer(token))
    assert response.status_code == 200, response.get_data(as_text=True)
    return {row["key"]: row["gpu_seconds"] for row in response.get_json()["rows"]}


def test_usage_by_user_day_and_gpu_from_the_attempts(
    client: FlaskClient, app: Flask, tokens: Tokens, history: Database
) -> None:
    assert usage(client, tokens.admin) == {"alice": 3600.0, "bob": 1800.0}
    assert usage(client, tokens.alice) == {"alice": 3600.0}  # others see themselves only
    assert usage(client, tokens.admin, "day") == {"2026-11-30": 1800.0 + 1800.0, "2026-12-01": 1800.0}
    alice_gpu, bob_gpu = app.config["TEST_GPUS"]
    by_gpu = {alice_gpu: 3600.0, bob_gpu: 1800.0} if alice_gpu != bob_gpu else {alice_gpu: 5400.0}
    assert usage(client, tokens.admin, "gpu") == by_gpu
    assert_error_body(client.get("/v1/usage?group_by=planet", headers=bearer(tokens.admin)), 400)
    body = assert_error_body(client.get("/v1/usage?from=yesterday", headers=bearer(tokens.admin)), 400)
    assert body["field"] == "from" and "yesterday" in body["detail"]


def test_usage_by_study_counts_trials_under_their_study(
    client: FlaskClient, tokens: Tokens, history: Database, datasets: dict[str, str]
) -> None:
    assert usage(client, tokens.admin, "study") == {"-": 5400.0}  # no study yet: every job on its own
    alice = history.user_by_name("alice")
    assert alice is not None
    study = history.create_study(alice.id, "lr sweep", datasets["alice"], {"trials": 1}, max_active=2)
    job = post(client, tokens.alice, datasets["alice"], 0.25)
    with history.engine.begin() as conn:  # as the study driver's submit_trial records it
        trial = text("UPDATE jobs SET study_id = :s, trial_number = 0 WHERE id = :j")
        conn.execute(trial, {"s": study.id, "j": job["id"]})
    ran(history, job, T0, 1)
    assert usage(client, tokens.admin, "study") == {"-": 5400.0, study.id: 900.0}


def test_metrics_and_users_me_show_use_and_quota(client: FlaskClient, tokens: Tokens, history: Database) -> None:
    text = client.get("/metrics").get_data(as_text=True)  # anonymous (loopback): no user names
    assert "gpuyard_gpu_seconds_total 5400.0" in text and 'user="alice"' not in text
    assert "gpuyard_preemptions_total 0.0" in text
    text = client.get("/metrics", headers=bearer(tokens.admin)).get_data(as_text=True)  # privileged: by user
    assert 'gpuyard_gpu_seconds_total{user="alice"} 3600.0' in text
    me = client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()
    assert me["quota"]["gpu_hours"] is None and me["quota"]["over_quota"] is False
    history.set_quota("alice", 0.5, "month")
    # the two hours ran before the last 30 days of now only if now is far off: count against a window at T0
    quota = history.quota_of(history.user_by_name("alice"), now=T0 + dt.timedelta(hours=3))
    assert quota.used_gpu_hours == pytest.approx(1.0) and quota.over


def test_an_attempt_whose_worker_died_counts_until_its_lease_expired_once(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats)
    db = _db(app)
    job = post(client, tokens.alice, datasets["alice"], 0.5)
    assert db.take_lease(job["id"], "w", 60, gpu=job["gpu"], now=T0) is not None  # then the worker dies
    window = (T0 - dt.timedelta(days=1), T0 + dt.timedelta(days=1))
    assert db.usage(*window, now=T0 + dt.timedelta(seconds=30))[0].gpu_seconds == 15.0  # running: so far
    later = T0 + dt.timedelta(hours=1)
    assert db.requeue_expired(later).requeued == [job["id"]]
    assert db.requeue_expired(later + dt.timedelta(hours=1)).requeued == []  # a restarted janitor: nothing again
    rows = db.usage(*window, now=later + dt.timedelta(hours=2))
    assert [(r.key, r.gpu_seconds, r.attempts) for r in rows] == [("alice", 30.0, 1)]  # 0.5 × 60 s of lease


def test_gpuyard_usage_csv_lists_both_users(server_url: str, tokens: Tokens, history: Database) -> None:
    result = CliRunner().invoke(
        main, ["usage", "--since", "2026-11-01", "--csv", "--url", server_url, "--token", tokens.admin]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["user"]: float(r["gpu_seconds"]) for r in rows} == {"alice": 3600.0, "bob": 1800.0}
    bad = CliRunner().invoke(main, ["usage", "--since", "lately", "--url", server_url, "--token", tokens.admin])
    assert bad.exit_code == 2 and "30d" in bad.output


def test_an_over_quota_users_job_waits_behind_everyone_and_says_over_quota(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats, online=(GPU0,))
    db = _db(app)
    now = dt.datetime.now(dt.UTC)
    ran(db, post(client, tokens.alice, datasets["alice"], 0.5), now - dt.timedelta(hours=1), 0.5)
    db.set_quota("alice", 0.001, "week")
    post(client, tokens.bob, datasets["bob"], 1.0)  # holds GPU 0
    mine = post(client, tokens.alice, datasets["alice"], 0.5)
    theirs = post(client, tokens.bob, datasets["bob"], 0.5)
    mine, theirs = (client.get(f"/v1/jobs/{j['id']}", headers=bearer(tokens.admin)).get_json() for j in (mine, theirs))
    assert mine["waiting_reason"] == "over_quota" and "quota" in mine["dispatch_note"]
    assert theirs["waiting_reason"] == "gpu_full" and theirs["queue_position"] == 1 and mine["queue_position"] == 2
    me = client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()["quota"]
    assert me["over_quota"] and me["gpu_hours"] == 0.001 and me["period"] == "week"


def _sign_in(app: Flask, token: str) -> FlaskClient:
    client = app.test_client()
    page = client.get("/ui/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert csrf, page
    assert client.post("/ui/login", data={"token": token, "csrf_token": csrf.group(1)}).status_code == 302
    return client


def test_the_usage_page_charts_and_tables_users_by_day(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats)
    db = _db(app)
    yesterday = dt.datetime.now(dt.UTC).replace(hour=1, minute=0, second=0, microsecond=0) - dt.timedelta(days=1)
    ran(db, post(client, tokens.alice, datasets["alice"], 0.5), yesterday, 2)  # 1 GPU-hour
    ran(db, post(client, tokens.bob, datasets["bob"], 1.0), yesterday, 0.5)  # 0.5 GPU-hours
    admin = _sign_in(app, tokens.admin).get("/ui/usage?days=7").get_data(as_text=True)
    data = json.loads(
        re.search(r'<script type="application/json" id="usage-data">(.*?)</script>', admin, re.S).group(1)
    )
    assert data["users"] == ["alice", "bob"] and len(data["days"]) == 7
    day = data["days"].index(yesterday.date().isoformat())
    assert [series[day] for series in data["hours"]] == [1.0, 0.5]
    assert "1.000" in admin and "0.500" in admin and 'id="usage-chart"' in admin
    mine = _sign_in(app, tokens.alice).get("/ui/usage").get_data(as_text=True)
    assert '"users": ["alice"]' in mine and "(yours)" in mine


@pytest.mark.slow
def test_the_usage_chart_draws_in_chromium(
    client: FlaskClient,
    app: Flask,
    server_url: str,
    tokens: Tokens,
    beats: dict[str, dict[str, Any]],
    datasets: dict[str, str],
) -> None:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    register_two(app, beats)
    yesterday = dt.datetime.now(dt.UTC).replace(hour=1, minute=0, second=0, microsecond=0) - dt.timedelta(days=1)
    ran(_db(app), post(client, tokens.alice, datasets["alice"], 0.5), yesterday, 2)
    ran(_db(app), post(client, tokens.bob, datasets["bob"], 1.0), yesterday, 0.5)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server_url + "/ui/login?next=/ui/usage")
        page.get_by_label("Token").fill(tokens.admin)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/ui/usage")
        page.wait_for_selector("#usage-chart canvas", timeout=15_000)
        assert page.get_attribute("#usage-chart", "data-users") == "2"
        assert page.locator("#usage-chart .u-legend").inner_text().count("alice") == 1
        browser.close()
    assert errors == []


def test_a_job_being_preempted_says_so_in_the_api_and_on_its_page(
    client: FlaskClient, app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]], datasets: dict[str, str]
) -> None:
    register_two(app, beats)
    db = _db(app)
    job = post(client, tokens.alice, datasets["alice"], 0.5)
    assert db.take_lease(job["id"], "w", 60, gpu=job["gpu"]) is not None
    with db.dispatch_lock("test") as txn:
        assert txn.request_preemption(job["id"], "job_urgent", dt.datetime.now(dt.UTC))
    shown = client.get(f"/v1/jobs/{job['id']}", headers=bearer(tokens.alice)).get_json()
    assert (shown["state"], shown["waiting_reason"], shown["preemptions"]) == ("running", "preempted_by job_urgent", 0)
    page = _sign_in(app, tokens.alice).get(f"/ui/jobs/{job['id']}").get_data(as_text=True)
    assert "stopping: preempted by job_urgent" in page


def test_pinning_needs_may_pin_and_quotas_are_set_by_the_admin_cli(
    client: FlaskClient,
    app: Flask,
    tokens: Tokens,
    beats: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    register_two(app, beats)
    body = {"dataset": datasets["alice"], "spec": {**MLP, "resources": {"preemptible": False}}}
    refused = assert_error_body(
        client.post("/v1/jobs", json=body, headers=bearer(tokens.alice)), 422, "pin_not_allowed"
    )
    assert refused["field"] == "spec.resources.preemptible" and "--may-pin" in refused["detail"]
    monkeypatch.setenv("GPUYARD_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("GPUYARD_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()  # the admin commands read the process's settings once
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    pinned = runner.invoke(main, ["users", "set-priority", "alice", "1", "--may-pin"])
    assert pinned.exit_code == 0 and "pin jobs" in pinned.output
    assert client.post("/v1/jobs", json=body, headers=bearer(tokens.alice)).status_code == 201
    quota = runner.invoke(main, ["users", "set-quota", "alice", "--gpu-hours", "2.5", "--per", "week"])
    assert quota.exit_code == 0 and "2.5 GPU-hours per week" in quota.output
    me = client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()
    assert (me["max_priority"], me["may_pin"], me["quota"]["gpu_hours"], me["quota"]["period"]) == (
        1,
        True,
        2.5,
        "week",
    )
    assert runner.invoke(main, ["users", "set-quota", "alice"]).exit_code == 0
    assert client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()["quota"]["gpu_hours"] is None
    assert runner.invoke(main, ["users", "set-quota", "nobody", "--gpu-hours", "1"]).exit_code == 1
