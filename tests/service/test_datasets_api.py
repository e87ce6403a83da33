"""POST/GET/DELETE /v1/datasets: streamed uploads, dedup, sandboxed validation, limits, in-use refusal."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import h5py
import numpy as np
import pytest
from api_helpers import GOOD_SPEC, Tokens, assert_error_body, bearer, upload


@pytest.fixture(scope="module")
def hostile_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Row counts that disagree and an external link to a host file: two reasons to refuse."""
    path = tmp_path_factory.mktemp("hostile") / "hostile.h5"
    with h5py.File(path, "w") as f:
        f["X_train"] = np.zeros((10, 4), "float32")
        f["Y_train"] = np.zeros((9,), "int64")
        f["evil"] = h5py.ExternalLink("/etc/passwd", "/x")
    return path


def test_upload_then_reupload(client, tokens: Tokens, digits_h5: Path, app) -> None:  # type: ignore[no-untyped-def]
    first = upload(client, tokens.alice, digits_h5)
    assert first.status_code == 201, first.get_json()
    body = first.get_json()
    assert body["sha256"] == hashlib.sha256(digits_h5.read_bytes()).hexdigest()
    assert body["size_bytes"] == digits_h5.stat().st_size
    assert body["summary"]["rows"]["train"] > 0 and body["owner"] == "alice"
    assert first.headers["Location"].endswith(f"/v1/datasets/{body['id']}")
    second = upload(client, tokens.alice, digits_h5)
    assert second.status_code == 200 and second.get_json()["id"] == body["id"]
    stored = Path(app.extensions["gpuyard"].settings.storage_dir) / "datasets" / body["sha256"][:2]
    assert [p.name for p in stored.iterdir()] == [f"{body['sha256']}.h5"]
    assert list((stored.parent.parent / "tmp").iterdir()) == []
    listed = client.get("/v1/datasets", headers=bearer(tokens.alice)).get_json()["datasets"]
    assert [d["id"] for d in listed] == [body["id"]]


def test_multipart_upload(client, tokens: Tokens, digits_h5: Path) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/datasets",
        data={"file": (io.BytesIO(digits_h5.read_bytes()), "digits.h5")},
        content_type="multipart/form-data",
        headers=bearer(tokens.alice),
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["name"] == "digits.h5"
    missing = client.post(
        "/v1/datasets", data={"other": "x"}, content_type="multipart/form-data", headers=bearer(tokens.alice)
    )
    assert assert_error_body(missing, 400)["field"] == "file"


def test_hostile_file_is_refused_with_every_reason(client, tokens: Tokens, hostile_file: Path, app) -> None:  # type: ignore[no-untyped-def]
    body = assert_error_body(upload(client, tokens.alice, hostile_file), 422, "dataset_invalid")
    codes = {p["code"] for p in body["problems"]}
    assert {"external_link", "row_mismatch"} <= codes
    storage_root = Path(app.extensions["gpuyard"].settings.storage_dir)
    assert not (storage_root / "datasets").exists()  # nothing kept
    assert list((storage_root / "tmp").iterdir()) == []


def test_not_hdf5_is_refused(client, tokens: Tokens, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"<html>not a data set</html>" * 10)
    body = assert_error_body(upload(client, tokens.alice, junk), 422, "dataset_invalid")
    assert body["problems"][0]["code"] == "not_hdf5"


def test_oversize_upload_is_413_json(client, tokens: Tokens, settings) -> None:  # type: ignore[no-untyped-def]
    data = b"\0" * (settings.max_upload_bytes + 1)
    response = client.post(
        "/v1/datasets", data=data, content_type="application/x-hdf5", headers=bearer(tokens.alice)
    )
    assert_error_body(response, 413, "payload_too_large")


def test_oversize_stream_without_length_is_413(client, tokens: Tokens, settings) -> None:  # type: ignore[no-untyped-def]
    # No Content-Length (a chunked upload, as gunicorn passes it on): the limit holds while streaming.
    stream = io.BytesIO(b"\0" * (settings.max_upload_bytes + 10))
    response = client.post(
        "/v1/datasets",
        input_stream=stream,
        content_type="application/x-hdf5",
        headers={**bearer(tokens.alice), "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_error_body(response, 413, "payload_too_large")


def test_empty_upload_is_400(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/datasets", data=b"", content_type="application/x-hdf5", headers=bearer(tokens.alice)
    )
    assert "empty" in assert_error_body(response, 400)["detail"]


def test_wrong_content_type_is_415(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/datasets", json={"x": 1}, headers=bearer(tokens.alice))
    assert_error_body(response, 415, "unsupported_media_type")


def test_delete_refused_while_a_job_uses_it(client, tokens: Tokens, digits_h5: Path, app) -> None:  # type: ignore[no-untyped-def]
    dataset = upload(client, tokens.alice, digits_h5).get_json()
    job = client.post(
        "/v1/jobs", json={"dataset": dataset["id"], "spec": GOOD_SPEC}, headers=bearer(tokens.alice)
    ).get_json()
    path = f"/v1/datasets/{dataset['id']}"
    assert_error_body(client.delete(path, headers=bearer(tokens.alice)), 409, "dataset_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens.alice))
    assert client.delete(path, headers=bearer(tokens.alice)).status_code == 204
    assert_error_body(client.get(path, headers=bearer(tokens.alice)), 404)
    stored = Path(app.extensions["gpuyard"].settings.storage_dir) / "datasets" / dataset["sha256"][:2]
    assert not any(stored.iterdir())
