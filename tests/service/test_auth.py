"""Bearer tokens: who may call what, and who sees which rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_helpers import Tokens, assert_error_body, bearer, upload
from click.testing import CliRunner

from cli.users import users
from core.settings import get_settings
from store import Database


def test_health_needs_no_token(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/health").get_json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets", "/v1/jobs/job_x/events", "/v1/datasets/ds_x"])
def test_everything_else_needs_a_token(client, path: str) -> None:  # type: ignore[no-untyped-def]
    response = client.get(path)
    assert_error_body(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_unknown_token_is_refused(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/v1/jobs", headers=bearer(tokens.alice + "x"))
    assert_error_body(response, 401)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert client.get("/v1/jobs", headers=bearer(tokens.alice)).status_code == 200


def test_users_see_only_their_own_rows_and_admins_see_all(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, digits_h5: Path
) -> None:
    dataset_id = upload(client, tokens.alice, digits_h5).get_json()["id"]
    assert_error_body(client.get(f"/v1/datasets/{dataset_id}", headers=bearer(tokens.bob)), 404, "not_found")
    assert client.get("/v1/datasets", headers=bearer(tokens.bob)).get_json() == {"datasets": []}
    assert_error_body(client.delete(f"/v1/datasets/{dataset_id}", headers=bearer(tokens.bob)), 404)
    job = client.post(
        "/v1/jobs",
        json={"dataset": dataset_id, "spec": {"architecture": {"family": "mlp", "widths": [8]}}},
        headers=bearer(tokens.alice),
    ).get_json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/logs"):
        assert_error_body(client.get(path, headers=bearer(tokens.bob)), 404)
    assert_error_body(client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens.bob)), 404)
    # Bob cannot run jobs on Alice's data either.
    response = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": {}}, headers=bearer(tokens.bob))
    assert response.status_code in (404, 422)
    admin_jobs = client.get("/v1/jobs", headers=bearer(tokens.admin)).get_json()["jobs"]
    assert [j["id"] for j in admin_jobs] == [job["id"]] and admin_jobs[0]["owner"] == "alice"
    assert client.get(f"/v1/datasets/{dataset_id}", headers=bearer(tokens.admin)).status_code == 200


def test_users_cli_creates_a_user_and_prints_the_token_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUYARD_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(users, ["create", "carol", "--admin"])
        assert result.exit_code == 0, result.output
        token = result.stdout.strip().splitlines()[-1]
        db = Database(get_settings().database_url)
        user = db.user_for_token(token)
        assert user is not None and user.name == "carol" and user.is_admin
        assert token not in (tmp_path / "gpuyard.db").read_bytes().decode("latin-1")
        again = runner.invoke(users, ["create", "carol"])
        assert again.exit_code != 0 and "already exists" in again.output
        listed = runner.invoke(users, ["list"])
        assert "carol" in listed.output and token not in listed.output
        db.dispose()
    finally:
        get_settings.cache_clear()


def test_users_cli_disables_enables_and_rotates_tokens_effective_on_the_next_request(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUYARD_DATA_DIR", str(settings.data_dir))  # the CLI and the app share the DB
    get_settings.cache_clear()
    try:
        runner = CliRunner()

        def status(token: str) -> int:
            return client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code

        assert status(tokens.alice) == 200
        assert runner.invoke(users, ["disable", "alice"]).exit_code == 0
        assert status(tokens.alice) == 401 and status(tokens.bob) == 200
        assert "yes" in runner.invoke(users, ["list"]).output
        assert runner.invoke(users, ["enable", "alice"]).exit_code == 0
        assert status(tokens.alice) == 200

        rotated = runner.invoke(users, ["rotate-token", "alice"])
        assert rotated.exit_code == 0, rotated.output
        new_token = rotated.stdout.strip().splitlines()[-1]
        assert new_token != tokens.alice
        assert status(tokens.alice) == 401 and status(new_token) == 200

        for command in ("disable", "enable", "rotate-token"):
            missing = runner.invoke(users, [command, "nobody"])
            assert missing.exit_code != 0 and "no user named 'nobody'" in missing.output
    finally:
        get_settings.cache_clear()
