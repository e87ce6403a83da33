"""/v1/studies: submit (every trial checked first), dry run, list, show, cancel; the data set stays while in use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_helpers import FakeQueue, Tokens, assert_error_body, bearer, upload
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from cli.main import main
from store import Database

REPO = Path(__file__).resolve().parents[2]
HIGHWAY = json.loads((REPO / "examples/specs/highway.json").read_text())
GRID = {"architecture.depth": {"choice": [2, 4]}, "architecture.width": {"choice": [32, 64]}}


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _body(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "depth x width",
        "dataset": dataset_id,
        "spec": HIGHWAY | {"resources": {"gpu": "cpu", "memory_fraction": 0.25}},
        "space": GRID,
        "sampler": "grid",
        "max_parallel": 2,
        **overrides,
    }


def _post(client: FlaskClient, token: str, body: dict[str, Any], query: str = "") -> Any:
    return client.post(f"/v1/studies{query}", json=body, headers=bearer(token))


def test_a_grid_study_is_accepted_and_queues_max_parallel_trials(
    client: FlaskClient, tokens: Tokens, dataset_id: str, queue: FakeQueue, app: Flask
) -> None:
    response = _post(client, tokens.alice, _body(dataset_id))
    assert response.status_code == 201, response.get_json()
    study = response.get_json()
    assert response.headers["Location"].endswith(f"/v1/studies/{study['id']}")
    assert (study["state"], study["trials_total"], study["max_parallel"], study["prune_on"]) == ("active", 4, 2, [])
    assert [t["number"] for t in study["trials"]] == [0, 1]
    assert all(t["state"] == "queued" and t["job"] for t in study["trials"])
    assert sorted(queue.sent) == sorted(t["job"] for t in study["trials"])  # dispatched at once (the CPU queue)
    job = client.get(f"/v1/jobs/{study['trials'][0]['job']}", headers=bearer(tokens.alice)).get_json()
    assert (job["study"], job["trial"]) == (study["id"], 0)
    params = study["trials"][0]["params"]
    assert (job["spec"]["architecture"]["depth"], job["spec"]["architecture"]["width"]) == (
        params["architecture.depth"],
        params["architecture.width"],
    )
    listed = client.get("/v1/studies", headers=bearer(tokens.alice)).get_json()["studies"]
    assert [s["id"] for s in listed] == [study["id"]] and listed[0]["counts"] == {"queued": 2}
    assert client.get("/v1/studies", headers=bearer(tokens.bob)).get_json()["studies"] == []
    assert client.get(f"/v1/studies/{study['id']}", headers=bearer(tokens.bob)).status_code == 404
    # The data set cannot go while the study is active.
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=bearer(tokens.alice)).status_code == 409


def test_a_space_reaching_a_too_wide_layer_is_refused_naming_it(
    client: FlaskClient, tokens: Tokens, dataset_id: str, app: Flask
) -> None:
    body = _body(
        dataset_id,
        sampler="random",
        trials=10,
        space={"architecture.width": {"int": [16, 100000], "log": True}},
    )
    error = assert_error_body(_post(client, tokens.alice, body), 422, "model_too_large")
    assert "architecture.width=100000" in error["detail"]
    assert error["problems"][0]["field"] == "spec.architecture.width"
    db: Database = app.extensions["gpuyard"].db
    assert db.list_studies() == []  # nothing recorded


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"space": {"architecture.depth": {"float": [1, 4]}}}, "space_invalid", "space.architecture.depth"),
        ({"space": {"architecture.depth": {"choice": []}}}, "space_invalid", "space.architecture.depth"),
        ({"space": {"architecture.depth": {"int": [4, 2]}}}, "space_invalid", "space.architecture.depth"),
        ({"space": {"architecture.depth": {"int": [1, 4], "log": True, "step": 2}}}, "space_invalid", None),
        ({"space": {"architecture..depth": {"choice": [1]}}}, "space_invalid", "space"),
        ({"sampler": "tpe", "space": {"x.y": {"choice": [1]}}}, "space_invalid", "trials"),
        ({"space": {"architecture.activation": {"choice": ["relu", "nope"]}}}, "spec_invalid", None),
        ({"max_parallel": 0}, "validation_error", "max_parallel"),
        ({"sampler": "bayes"}, "validation_error", "sampler"),
        ({"prune_on": ["bad_luck"]}, "validation_error", "prune_on"),
    ],
)
def test_bad_studies_are_refused_with_the_field(
    client: FlaskClient, tokens: Tokens, dataset_id: str, overrides: dict[str, Any], error: str, field: str | None
) -> None:
    body = assert_error_body(_post(client, tokens.alice, _body(dataset_id, **overrides)), 422)
    problems = body.get("problems") or [body]
    assert body["error"] == error or problems[0].get("code") == error or error in body["error"], body
    if field:
        fields = [p.get("field") for p in problems] + [body.get("field")]
        assert any(f and f.startswith(field) for f in fields), body


def test_dry_run_counts_trials_and_queues_nothing(
    client: FlaskClient, tokens: Tokens, dataset_id: str, queue: FakeQueue, app: Flask
) -> None:
    body = _body(dataset_id, max_parallel=3)
    response = _post(client, tokens.alice, body, "?dry_run=1")
    assert response.status_code == 200, response.get_json()
    out = response.get_json()
    assert (out["trials"], out["max_parallel"], out["checked"]) == (4, 3, 4)
    assert out["largest"]["params"] == {"architecture.depth": 4, "architecture.width": 64}
    assert len(out["first"]) == 3 and all(p["gpu"] == "cpu" for p in out["first"])
    assert queue.sent == [] and app.extensions["gpuyard"].db.list_studies() == []


def test_cancel_cancels_queued_trials(client: FlaskClient, tokens: Tokens, dataset_id: str) -> None:
    study = _post(client, tokens.alice, _body(dataset_id)).get_json()
    out = client.post(f"/v1/studies/{study['id']}/cancel", headers=bearer(tokens.alice)).get_json()
    assert out["state"] == "cancelled"
    assert {t["state"] for t in out["trials"]} == {"cancelled"}
    assert client.post(f"/v1/studies/{study['id']}/cancel", headers=bearer(tokens.bob)).status_code == 404


def test_active_studies_per_user_are_capped(
    client: FlaskClient, tokens: Tokens, dataset_id: str, settings: Any
) -> None:
    for _ in range(settings.max_active_studies_per_user):
        assert _post(client, tokens.alice, _body(dataset_id)).status_code == 201
    assert_error_body(_post(client, tokens.alice, _body(dataset_id)), 429)


def test_the_study_pages_show_trials_chart_and_pruned_reasons(
    client: FlaskClient, tokens: Tokens, dataset_id: str, app: Flask
) -> None:
    study = _post(client, tokens.alice, _body(dataset_id)).get_json()
    db: Database = app.extensions["gpuyard"].db
    first, second = db.study_jobs(study["id"])
    db.take_lease(first.id, "test", 30)
    db.record_progress(first.id, {"loss": 0.2, "metrics": {"val_accuracy": 0.95}})
    db.finish_job(first.id, "test", "succeeded")
    db.take_lease(second.id, "test", 30)
    db.request_prune(second.id, "loss_not_finite", "loss_not_finite at epoch 1: the loss is nan")
    db.finish_job(second.id, "test", "cancelled")
    page = client.get("/ui/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert csrf is not None
    client.post("/ui/login", data={"token": tokens.alice, "csrf_token": csrf.group(1)})
    listing = client.get("/ui/studies").get_data(as_text=True)
    assert study["id"] in listing and "depth x width" in listing
    response = client.get(f"/ui/studies/{study['id']}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'id="trials-table"' in html and 'id="study-best"' in html
    assert "Not enough completed trials yet" in html  # importances need more than one
    assert "loss_not_finite at epoch 1: the loss is nan" in html  # the pruned trial's reason, shown
    assert f'href="/ui/jobs/{first.id}"' in html and "0.95" in html
    chart = json.loads(
        re.search(r'<script type="application/json" id="study-data">(.*?)</script>', html, re.S).group(1)
    )  # type: ignore[union-attr]
    assert chart["value"][0] == 0.95 and chart["best"][0] == 0.95 and chart["pruned"][0] is None
    assert client.get("/ui/studies/study_nope").status_code == 404


def test_the_study_cli_creates_shows_and_downloads_the_best_model(
    server_url: str, tokens: Tokens, dataset_id: str, app: Flask, tmp_path: Path
) -> None:
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump({**_body(dataset_id), "space": {"architecture.depth": {"choice": [2, 4]}}, "max_parallel": 1})
    )
    auth = ["--url", server_url, "--token", tokens.alice]
    dry = CliRunner().invoke(main, ["study", "create", str(study_file), "--dry-run", *auth])
    assert dry.exit_code == 0, dry.output
    assert "2 trials, 1 at a time; 2 trial specs checked" in dry.output
    created = CliRunner().invoke(main, ["study", "create", str(study_file), *auth])
    assert created.exit_code == 0, created.output
    study_id = created.output.strip()
    no_best = CliRunner().invoke(main, ["study", "best", study_id, *auth])
    assert no_best.exit_code == 1 and "no succeeded trial yet" in no_best.output
    svc = app.extensions["gpuyard"]
    job = svc.db.study_jobs(study_id)[0]
    svc.db.take_lease(job.id, "test", 30)
    svc.db.record_progress(job.id, {"loss": 0.2, "metrics": {"val_accuracy": 0.97}})
    svc.db.finish_job(job.id, "test", "succeeded")
    folder = svc.storage.local_path(svc.storage.job_key(job.id))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.h5").write_bytes(b"the best model")
    status = CliRunner().invoke(main, ["study", "status", study_id, *auth])
    assert status.exit_code == 0 and "0.97" in status.output and "succeeded" in status.output, status.output
    best = CliRunner().invoke(main, ["study", "best", study_id, "--download", str(tmp_path / "best"), *auth])
    assert best.exit_code == 0, best.output
    assert "val_accuracy 0.97" in best.output
    assert (tmp_path / "best" / "model.h5").read_bytes() == b"the best model"
