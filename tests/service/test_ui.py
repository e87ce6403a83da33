"""The dashboard's blueprint through Flask's test client: sign-in, cookie flags, CSRF refusals, a user
seeing only their own jobs (404 page otherwise), admin-only drain/undrain, the pages' data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, FakeQueue, Tokens, bearer, free_port, upload
from flask import Flask
from flask.testing import FlaskClient

from core.names import DIAGNOSTICS, HISTORY, TRAINER_LOG
from core.settings import Settings
from service.app import create_app
from service.sessions import SESSION_COOKIE, load_secret_key
from service.ui.jobs import spec_differences
from store import Database
from worker.gpus import GiB, fake_uuid

GPU0 = fake_uuid(0)


def _db(app: Flask) -> Database:
    return app.extensions["gpuyard"].db


def _csrf(client: FlaskClient, path: str = "/ui/login") -> str:
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert match, page
    return match.group(1)


def _sign_in(client: FlaskClient, token: str) -> Any:
    response = client.post("/ui/login", data={"token": token, "csrf_token": _csrf(client)})
    assert response.status_code == 302, response.get_data(as_text=True)
    return response


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _alice_job(client: FlaskClient, tokens: Tokens, dataset_id: str, spec: dict[str, Any] | None = None) -> str:
    response = client.post(
        "/v1/jobs", json={"dataset": dataset_id, "spec": spec or GOOD_SPEC}, headers=bearer(tokens.alice)
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def test_pages_need_a_session_and_root_leads_to_the_jobs(client: FlaskClient) -> None:
    assert client.get("/").headers["Location"] == "/ui/jobs"
    response = client.get("/ui/jobs?state=running")
    assert response.status_code == 302 and response.headers["Location"].startswith("/ui/login?next=")
    assert "state%3Drunning" in response.headers["Location"] or "state=running" in response.headers["Location"]
    fragment = client.get("/ui/jobs/rows", headers={"HX-Request": "true"})
    assert fragment.status_code == 204 and fragment.headers["HX-Redirect"].startswith("/ui/login")
    page = client.get("/ui/login").get_data(as_text=True)
    assert '<label for="token">Token</label>' in page and 'id="token" name="token"' in page


def test_sign_in_with_a_token_sets_a_hardened_cookie_without_the_token(
    app: Flask, client: FlaskClient, tokens: Tokens
) -> None:
    wrong = client.post("/ui/login", data={"token": "gy_wrong", "csrf_token": _csrf(client)})
    assert wrong.status_code == 401 and "not valid" in wrong.get_data(as_text=True)
    response = client.post("/ui/login", data={"token": tokens.alice, "csrf_token": _csrf(client), "next": "/ui/gpus"})
    assert response.status_code == 302 and response.headers["Location"] == "/ui/gpus"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert tokens.alice not in cookie
    response = client.get("/ui/jobs")
    page = response.get_data(as_text=True)
    assert "alice" in page and "Sign out" in page
    assert "script-src 'self';" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    # Over HTTPS the cookie is Secure; an offsite ?next= is not followed.
    browser = app.test_client()
    https = browser.post(
        "/ui/login",
        data={"token": tokens.alice, "csrf_token": _csrf(browser), "next": "//evil.example/x"},
        base_url="https://localhost",
        headers={"Referer": "https://localhost/ui/login"},
    )
    assert https.headers["Location"] == "/ui/jobs"
    assert any("Secure" in c for c in https.headers.getlist("Set-Cookie") if c.startswith(SESSION_COOKIE))


def test_sign_out_ends_the_session(client: FlaskClient, tokens: Tokens) -> None:
    _sign_in(client, tokens.alice)
    assert client.get("/ui/jobs").status_code == 200
    assert client.post("/ui/logout", data={"csrf_token": _csrf(client, "/ui/jobs")}).status_code == 302
    assert client.get("/ui/jobs").status_code == 302


def test_a_form_posted_without_its_csrf_token_is_refused(
    client: FlaskClient, app: Flask, tokens: Tokens, dataset_id: str
) -> None:
    assert client.post("/ui/login", data={"token": tokens.alice}).status_code == 400  # even the sign-in
    job_id = _alice_job(client, tokens, dataset_id)
    _sign_in(client, tokens.alice)
    refused = client.post(f"/ui/jobs/{job_id}/cancel", data={})
    assert refused.status_code == 400 and "token" in refused.get_data(as_text=True).lower()
    refused = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": "forged"})
    assert refused.status_code == 400
    assert not _db(app).get_job(job_id).cancel_requested  # type: ignore[union-attr]
    accepted = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": _csrf(client, "/ui/jobs")})
    assert accepted.status_code == 302
    assert _db(app).get_job(job_id).state == "cancelled"  # type: ignore[union-attr]


def test_the_session_cookie_reads_the_api_but_writes_only_with_the_csrf_header(
    client: FlaskClient, app: Flask, tokens: Tokens, dataset_id: str
) -> None:
    job_id = _alice_job(client, tokens, dataset_id)
    _sign_in(client, tokens.alice)
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200 and [j["id"] for j in listed.get_json()["jobs"]] == [job_id]
    refused = client.post(f"/v1/jobs/{job_id}/cancel")
    assert refused.status_code == 400 and refused.get_json()["error"] == "csrf_failed"
    assert "X-CSRFToken" in refused.get_json()["detail"]
    assert not _db(app).get_job(job_id).cancel_requested  # type: ignore[union-attr]
    accepted = client.post(f"/v1/jobs/{job_id}/cancel", headers={"X-CSRFToken": _csrf(client, "/ui/jobs")})
    assert accepted.status_code == 200 and accepted.get_json()["state"] == "cancelled"
    # A bearer token still decides on its own, whatever cookie comes with it.
    assert client.get("/v1/jobs", headers=bearer(tokens.bob)).get_json()["jobs"] == []


def test_another_users_job_is_a_404_page_and_admins_see_everyones(
    app: Flask, tokens: Tokens, dataset_id: str, client: FlaskClient
) -> None:
    job_id = _alice_job(client, tokens, dataset_id)
    other_id = _alice_job(client, tokens, dataset_id)
    bob = app.test_client()
    _sign_in(bob, tokens.bob)
    page = bob.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "404" in page.get_data(as_text=True) and job_id in page.get_data(as_text=True)
    assert job_id not in bob.get("/ui/jobs").get_data(as_text=True)
    assert bob.get(f"/ui/compare?jobs={job_id},{other_id}").status_code == 404
    assert bob.get(f"/ui/jobs/{job_id}/status").status_code == 404
    assert bob.get(f"/v1/jobs/{job_id}/events").status_code == 404
    cancel = bob.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": _csrf(bob, "/ui/jobs")})
    assert cancel.status_code == 404 and not _db(app).get_job(job_id).cancel_requested  # type: ignore[union-attr]
    alice = app.test_client()
    _sign_in(alice, tokens.alice)
    assert alice.get(f"/ui/jobs/{job_id}").status_code == 200
    admin = app.test_client()
    _sign_in(admin, tokens.admin)
    listing = admin.get("/ui/jobs").get_data(as_text=True)
    assert job_id in listing and other_id in listing
    assert admin.get(f"/ui/jobs/{job_id}").status_code == 200


def test_only_an_admin_drains_and_undrains_a_gpu(app: Flask, tokens: Tokens, beats: dict[str, dict[str, Any]]) -> None:
    _db(app).register_gpu(GPU0, host="node1", index=0, name="Fake GPU 16 GiB", memory_total_bytes=16 * GiB)
    beats[GPU0] = {
        "host": "node1", "slots": 2, "memory_total_bytes": 16 * GiB, "memory_used_bytes": 3 * GiB,
        "utilization_percent": 37, "foreign_bytes": 3 * GiB, "gpuyard_bytes": 0, "time": 1.0,
        "processes": [{"pid": 4242, "pgid": 4242, "memory_bytes": 3 * GiB, "gpuyard": False}],
    }  # fmt: skip
    alice = app.test_client()
    _sign_in(alice, tokens.alice)
    board = alice.get("/ui/gpus").get_data(as_text=True)
    assert "Fake GPU 16 GiB" in board and "pid 4242" in board and "37 %" in board and "online" in board
    assert "Drain GPU 0" not in board  # no button for a non-admin
    refused = alice.post(f"/ui/gpus/{GPU0}/drain", data={"csrf_token": _csrf(alice, "/ui/gpus")})
    assert refused.status_code == 403 and _db(app).get_gpu(GPU0).draining_since is None  # type: ignore[union-attr]
    admin = app.test_client()
    _sign_in(admin, tokens.admin)
    assert "Drain GPU 0" in admin.get("/ui/gpus").get_data(as_text=True)
    assert admin.post(f"/ui/gpus/{GPU0}/drain", data={"csrf_token": _csrf(admin, "/ui/gpus")}).status_code == 302
    assert _db(app).get_gpu(GPU0).draining_since is not None  # type: ignore[union-attr]
    board = admin.get("/ui/gpus/board").get_data(as_text=True)
    assert "state-draining" in board and "Undrain GPU 0" in board
    assert admin.post(f"/ui/gpus/{GPU0}/undrain", data={"csrf_token": _csrf(admin, "/ui/gpus")}).status_code == 302
    assert _db(app).get_gpu(GPU0).draining_since is None  # type: ignore[union-attr]
    missing = admin.post("/ui/gpus/GPU-nope/drain", data={"csrf_token": _csrf(admin, "/ui/gpus")})
    assert missing.status_code == 404


def test_the_job_page_and_compare_show_what_the_job_wrote(
    app: Flask, client: FlaskClient, tokens: Tokens, dataset_id: str
) -> None:
    deep = {**GOOD_SPEC, "name": "deep sigmoid", "architecture": {"family": "mlp", "widths": [16, 16]}}
    first, second = _alice_job(client, tokens, dataset_id, deep), _alice_job(client, tokens, dataset_id)
    storage = app.extensions["gpuyard"].storage
    storage.write_bytes(storage.job_key(first, HISTORY), json.dumps({"epoch": [1, 2], "loss": [0.9, 0.5]}).encode())
    records = [
        {
            "epoch": e,
            "blocks": {
                "input": {"gradient_norm": 0.0},
                "dense_0": {"gradient_norm": g0},
                "dense_1": {"gradient_norm": 1.0},
            },
        }
        for e, g0 in ((0, 0.01), (1, 0.1), (2, 0.5))
    ]
    storage.write_bytes(storage.job_key(first, DIAGNOSTICS), json.dumps(records).encode())
    storage.write_bytes(storage.job_key(first, TRAINER_LOG), b"".join(b"line %d <b>\n" % i for i in range(100)))
    db = _db(app)
    db.take_lease(second, "w1", 60)
    db.append_event(second, {"event": "epoch_end", "epoch": 1, "loss": 0.7, "metrics": {"val_accuracy": 0.8}})
    blocks = {"dense_0": {"gradient_norm": 0.2}, "dense_1": {"gradient_norm": 0.4}}
    db.append_event(second, {"event": "diagnostics", "epoch": 1, "probe_loss": 0.7, "blocks": blocks})
    _sign_in(client, tokens.alice)

    page = client.get(f"/ui/jobs/{first}").get_data(as_text=True)
    assert 'id="loss-chart"' in page and 'id="gradient-heatmap"' in page and f"/v1/jobs/{first}/events" in page
    assert f"/v1/jobs/{first}/artifacts/history.json" in page
    assert "line 99 &lt;b&gt;" in page and "line 39 " not in page  # the tail, escaped
    assert "deep sigmoid" in page and "train 1" in page  # the spec and the data set summary

    compare = client.get(f"/ui/compare?jobs={first}&jobs={second}").get_data(as_text=True)
    data = json.loads(re.search(r'id="compare-data">(.*?)</script>', compare, re.S).group(1))  # type: ignore[union-attr]
    assert data[0]["columns"]["loss"] == [0.9, 0.5] and data[0]["ratio"]["ratio"] == pytest.approx([0.01, 0.1, 0.5])
    assert data[1]["columns"] == {"epoch": [1], "loss": [0.7], "val_accuracy": [0.8]}  # from its events
    assert data[1]["ratio"] == {"epoch": [1], "ratio": [0.5]}
    assert "architecture.widths" in compare and "[16, 16]" in compare
    too_many = client.get("/ui/compare?jobs=" + ",".join(f"job_{i}" for i in range(9)))
    assert too_many.status_code == 422 and "Received: 9" in too_many.get_data(as_text=True)


def test_the_job_list_shows_queue_positions_live_progress_and_final_metrics(
    app: Flask, client: FlaskClient, tokens: Tokens, dataset_id: str, beats: dict[str, dict[str, Any]]
) -> None:
    _db(app).register_gpu(GPU0, host="node1", index=0, name="Fake GPU 16 GiB", memory_total_bytes=16 * GiB)
    beats[GPU0] = {
        "host": "node1", "slots": 4, "memory_total_bytes": 16 * GiB, "memory_used_bytes": 0,
        "utilization_percent": 0, "processes": [], "foreign_bytes": 0, "gpuyard_bytes": 0, "time": 1.0,
    }  # fmt: skip
    half = {**GOOD_SPEC, "resources": {"memory_fraction": 0.6}}
    db = _db(app)
    done = _alice_job(client, tokens, dataset_id, half)
    assert db.take_lease(done, "w1", 60) is not None
    final = {"final_metrics": {"test": {"accuracy": 0.9721, "loss": 0.1096}}, "stage": "finished"}
    assert db.record_progress(done, final, owner="w1")
    db.finish_job(done, "w1", "succeeded", exit_code=0)
    running = _alice_job(client, tokens, dataset_id, half)
    assert db.take_lease(running, "w1", 60) is not None
    progress = {"stage": "training", "epoch": 2, "epochs": 5, "step": 3, "steps": 10, "samples_per_s": 812.0}
    assert db.record_progress(running, {**progress, "eta_s": 75.0}, owner="w1")
    waiting = _alice_job(client, tokens, dataset_id, half)  # 0.6 + 0.6 > 1: it waits
    _sign_in(client, tokens.alice)

    rows = client.get("/ui/jobs/rows").get_data(as_text=True)
    waiting_row = next(row for row in rows.split("</tr>") if waiting in row)
    assert "<td>1</td>" in waiting_row and "memory fraction free" in waiting_row  # position and reason
    assert "epoch 2/5, batch 3/10" in rows and "ETA 1 min 15 s" in rows and "812 samples/s" in rows
    assert "accuracy 0.9721" in rows and "state-succeeded" in rows
    only_done = client.get("/ui/jobs?state=succeeded").get_data(as_text=True)
    assert done in only_done and running not in only_done and waiting not in only_done
    status = client.get(f"/ui/jobs/{running}/status").get_data(as_text=True)
    assert 'hx-trigger="every 2s, refresh"' in status and "Fake GPU 16 GiB" in status and "10.6 GiB" in status
    assert "hx-trigger" not in client.get(f"/ui/jobs/{done}/status").get_data(as_text=True)  # polling stops


def test_spec_differences_lists_only_fields_that_differ() -> None:
    rows = spec_differences([{"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}}])
    assert rows == [("a.c", ["2", "5"]), ("d", ["3", "—"])]


def test_datasets_page_lists_and_deletes_and_the_api_upload_takes_the_cookie(
    app: Flask, client: FlaskClient, tokens: Tokens, digits_h5: Path
) -> None:
    _sign_in(client, tokens.alice)
    csrf = _csrf(client, "/ui/datasets")
    with digits_h5.open("rb") as fh:
        uploaded = client.post(
            "/v1/datasets?name=digits.h5", data={"file": (fh, "digits.h5")}, headers={"X-CSRFToken": csrf}
        )
    assert uploaded.status_code == 201, uploaded.get_json()
    dataset_id = uploaded.get_json()["id"]
    page = client.get("/ui/datasets").get_data(as_text=True)
    assert dataset_id in page and "digits.h5" in page
    assert dataset_id in client.get("/ui/submit").get_data(as_text=True)
    bob = app.test_client()
    _sign_in(bob, tokens.bob)
    assert dataset_id not in bob.get("/ui/datasets").get_data(as_text=True)
    assert bob.post(f"/ui/datasets/{dataset_id}/delete", data={"csrf_token": _csrf(bob, "/ui/jobs")}).status_code == 404
    assert client.post(f"/ui/datasets/{dataset_id}/delete", data={"csrf_token": csrf}).status_code == 302
    assert _db(app).get_dataset(dataset_id) is None


def test_the_secret_key_is_made_once_0600_and_shared(tmp_path: Path) -> None:
    first = load_secret_key(tmp_path / "data")
    assert len(first) >= 32 and load_secret_key(tmp_path / "data") == first
    assert (tmp_path / "data" / "secret-key").stat().st_mode & 0o777 == 0o600
    assert list((tmp_path / "data").iterdir()) == [tmp_path / "data" / "secret-key"]  # no temporary left
    settings = Settings(data_dir=tmp_path / "other", redis_url=f"redis://127.0.0.1:{free_port()}/0", secret_key="s3")
    app = create_app({"TESTING": True, "GPUYARD_SETTINGS": settings, "GPUYARD_JOB_QUEUE": FakeQueue()})
    assert app.secret_key == "s3" and not (tmp_path / "other" / "secret-key").exists()
    app.extensions["gpuyard"].db.dispose()


def test_the_log_tail_shows_no_server_path_nor_framework_noise(
    client: FlaskClient, app: Flask, tokens: Tokens, dataset_id: str
) -> None:
    job_id = _alice_job(client, tokens, dataset_id)
    svc = app.extensions["gpuyard"]
    storage = svc.storage
    install = str(Path(__file__).resolve().parents[2])
    log = "\n".join(
        [
            "=== gpuyard attempt 1 on vm, cold start ===",
            "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "I0000 00:00:1796404271.688010   21131 port.cc:153] oneDNN custom operations are on.",
            "W0000 00:00:1796404271.700000   21131 cuda_blas.cc:1418] Unable to register cuBLAS factory",
            f"WARNING:py.warnings:{install}/.venv/lib/python3.11/site-packages/keras/src/core.py:172: "
            "DeprecationWarning: __array__ implementation doesn't accept a copy keyword",
            "  return np.array(x)",
            f"{install}/.venv/lib/python3.11/site-packages/keras/src/layers/core/input_layer.py:27: UserWarning: "
            "Argument `input_shape` is deprecated.",
            "  warnings.warn(",
            "WARNING:absl:You are saving your model as an HDF5 file via `model.save()`.",
            "epoch 1/3 loss 0.52",
            f'  File "{install}/worker/trainer/run.py", line 12, in main',
            f"cannot read {svc.settings.storage_dir}/jobs/{job_id}/checkpoint/model-0001.keras",
            "E0000 00:00:1796404271.9 21131 cuda_executor.cc:1] failed call to cuInit: no CUDA-capable device",
        ]
    )
    storage.write_bytes(storage.job_key(job_id, TRAINER_LOG), log.encode())
    _sign_in(client, tokens.alice)
    page = client.get(f"/ui/jobs/{job_id}").get_data(as_text=True)
    assert "epoch 1/3 loss 0.52" in page and "cannot read model-0001.keras" in page
    assert "File &#34;run.py&#34;, line 12" in page
    assert "failed call to cuInit" in page  # errors stay
    assert install not in page and str(svc.settings.storage_dir) not in page
    for noise in ("absl::InitializeLog", "oneDNN", "cuBLAS factory", "DeprecationWarning", "np.array(x)",
                  "UserWarning", "warnings.warn(", "HDF5 file via"):  # fmt: skip
        assert noise not in page, noise
