"""Notify URLs in the API: a job's list at submit, a user's defaults, the webhook secret shown once."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, Tokens, assert_error_body, bearer, services, upload
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from cli.users import users
from core.settings import get_settings


@pytest.fixture
def dataset(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def test_submit_stores_the_jobs_notify_urls(client: FlaskClient, tokens: Tokens, dataset: str, app: Flask) -> None:
    urls = ["https://hooks.example.com/gpuyard", "slack://T1/B1/C1"]
    response = client.post(
        "/v1/jobs", json={"dataset": dataset, "spec": GOOD_SPEC, "notify": urls}, headers=bearer(tokens.alice)
    )
    assert response.status_code == 201, response.get_json()
    assert services(app).db.get_job(response.get_json()["id"]).notify == urls


def test_submit_refuses_bad_notify_urls_naming_each(client: FlaskClient, tokens: Tokens, dataset: str) -> None:
    bad = ["https://ok.example.com/", "ftp://example.com/x", "json://example.com/"]
    response = client.post(
        "/v1/jobs", json={"dataset": dataset, "spec": GOOD_SPEC, "notify": bad}, headers=bearer(tokens.alice)
    )
    body = assert_error_body(response, 422, "notify_invalid")
    assert [p["field"] for p in body["problems"]] == ["notify[1]", "notify[2]"]
    assert "ftp://example.com" in body["problems"][0]["detail"]  # the rest redacted: apprise URLs hold tokens
    many = ["https://example.com/"] * 50
    response = client.post(
        "/v1/jobs", json={"dataset": dataset, "spec": GOOD_SPEC, "notify": many}, headers=bearer(tokens.alice)
    )
    assert assert_error_body(response, 422, "notify_invalid")["field"] == "notify"


def test_user_defaults_and_the_webhook_secret(client: FlaskClient, tokens: Tokens, app: Flask) -> None:
    me = client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()
    assert {key: me[key] for key in ("name", "is_admin", "notify", "has_webhook_secret")} == {
        "name": "alice",
        "is_admin": False,
        "notify": [],
        "has_webhook_secret": False,
    }

    urls = ["https://hooks.example.com/alice"]
    assert (
        client.put("/v1/users/me/notify", json={"notify": urls}, headers=bearer(tokens.alice)).get_json()["notify"]
        == urls
    )
    refused = client.put("/v1/users/me/notify", json={"notify": ["gopher://x"]}, headers=bearer(tokens.alice))
    assert assert_error_body(refused, 422, "notify_invalid")["field"] == "notify[0]"

    first = client.post("/v1/users/me/webhook-secret", headers=bearer(tokens.alice))
    assert first.status_code == 201
    secret = first.get_json()["secret"]
    assert first.get_json()["header"] == "X-Gpuyard-Signature"
    me = client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()
    assert me["has_webhook_secret"] and secret not in str(me)  # shown once, at creation
    second = client.post("/v1/users/me/webhook-secret", headers=bearer(tokens.alice)).get_json()["secret"]
    db = services(app).db
    assert second != secret and db.webhook_secret(db.user_by_name("alice").id) == second
    assert client.get("/v1/users/me").status_code == 401


def test_users_cli_rotates_the_secret_and_sets_defaults(
    client: FlaskClient, tokens: Tokens, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUYARD_DATA_DIR", str(services(app).settings.data_dir))  # the CLI and the app share the DB
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        rotated = runner.invoke(users, ["webhook-secret", "alice"])
        assert rotated.exit_code == 0, rotated.output
        db = services(app).db
        assert rotated.stdout.strip() == db.webhook_secret(db.user_by_name("alice").id)

        urls = ["https://hooks.example.com/a", "mailto://u:p@example.com"]
        assert runner.invoke(users, ["notify", "alice", *urls]).exit_code == 0
        assert client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()["notify"] == urls
        assert runner.invoke(users, ["notify", "alice"]).stdout.split() == urls
        refused = runner.invoke(users, ["notify", "alice", "ftp://x"])
        assert refused.exit_code != 0 and "URLS[0]" in refused.output
        assert runner.invoke(users, ["notify", "alice", "--clear"]).exit_code == 0
        assert db.user_by_name("alice").notify is None
        for command in ("webhook-secret", "notify"):
            missing = runner.invoke(users, [command, "nobody"])
            assert missing.exit_code != 0 and "no user named 'nobody'" in missing.output
    finally:
        get_settings.cache_clear()


def test_submit_and_user_defaults_refuse_internal_notify_targets(
    client: FlaskClient, tokens: Tokens, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSRF: a notify target at a loopback or private address is a 422 naming the URL and the address."""
    real = socket.getaddrinfo

    def fake_dns(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.innocent.example":  # a public-looking name that answers loopback
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    bad = ["gotify://127.0.0.1:9/x", "http://0x7f000001/", "https://hooks.innocent.example/h"]
    response = client.post(
        "/v1/jobs", json={"dataset": dataset, "spec": GOOD_SPEC, "notify": bad}, headers=bearer(tokens.alice)
    )
    body = assert_error_body(response, 422, "notify_invalid")
    assert [(p["field"], p["code"]) for p in body["problems"]] == [
        ("notify[0]", "address_refused"),
        ("notify[1]", "address_refused"),
        ("notify[2]", "address_refused"),
    ]
    assert body["problems"][0]["detail"] == (
        "gotify://127.0.0.1:9/… resolves to 127.0.0.1, a loopback address; "
        "allowed: public addresses or GPUYARD_NOTIFY_ALLOWED_NETWORKS"
    )
    assert body["problems"][1]["detail"].startswith("http://0x7f000001/… resolves to 127.0.0.1, a loopback address")
    assert "hooks.innocent.example/… resolves to 127.0.0.1" in body["problems"][2]["detail"]

    refused = client.put(
        "/v1/users/me/notify", json={"notify": ["http://[::ffff:127.0.0.1]:8000/"]}, headers=bearer(tokens.alice)
    )
    problem = assert_error_body(refused, 422, "notify_invalid")
    assert problem["field"] == "notify[0]" and "a loopback address" in problem["detail"]
    assert client.get("/v1/users/me", headers=bearer(tokens.alice)).get_json()["notify"] == []
