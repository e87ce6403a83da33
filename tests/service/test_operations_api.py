"""Using a trained model through the API: evaluate, predict, export (ONNX, SavedModel), and the refusals.

One digits Highway job is trained for the whole module (the real trainer, about 10-30 s here, asked for an
ONNX export in its spec); each operation then runs in the real worker-side runner and child process (5-15 s
each: TensorFlow starts). The API sends operations to a stand-in queue that runs them at once.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from api_helpers import FakeDryRun, FakeQueue, Tokens, assert_error_body, bearer, services, upload
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from cli.main import main as gpuyard
from core.atomicio import file_sha256
from core.names import MODEL_H5, MODEL_ONNX, SAVED_MODEL_ZIP, SUMMARY
from core.settings import Settings
from core.states import QUEUED, SUCCEEDED
from service.app import create_app
from service.client import Client, ClientError
from store import Database
from worker.operations import run_operation
from worker.storage import LocalStorage
from worker.supervisor import supervise

pytestmark = pytest.mark.slow


@dataclass
class Trained:
    app: Flask
    settings: Settings
    job_id: str
    dataset_id: str
    alice: str
    bob: str
    reported: dict[str, Any]
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def client(self) -> FlaskClient:
        return self.app.test_client()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_h5: Path) -> Iterator[Trained]:
    root = tmp_path_factory.mktemp("operations")
    settings = Settings(data_dir=root / "gpuyard", redis_url="", validate_cpu_seconds=20, max_predict_bytes=512 * 1024)
    assert settings.storage_dir is not None
    storage = LocalStorage(settings.storage_dir)
    runner_db = Database(settings.database_url)

    def run_now(operation_id: str, queue: str) -> None:
        run_operation(operation_id, settings, db=runner_db, storage=storage)

    app = create_app(
        {
            "TESTING": True,
            "GPUYARD_SETTINGS": settings,
            "GPUYARD_JOB_QUEUE": FakeQueue(),
            "GPUYARD_OPERATION_QUEUE": run_now,
            "GPUYARD_DRY_RUNNER": FakeDryRun(),
            "GPUYARD_GPU_HEARTBEATS": lambda uuids: {},
        }
    )
    db: Database = app.extensions["gpuyard"].db
    alice = db.create_user("alice")[1]
    bob = db.create_user("bob")[1]
    client = app.test_client()
    dataset = upload(client, alice, digits_h5).get_json()
    spec = {
        "architecture": {"family": "highway", "depth": 2, "width": 32},
        "training": {"epochs": 20, "batch_size": 64},
        "output": {"export": ["onnx"]},
        "resources": {"gpu": "cpu"},
    }
    created = client.post("/v1/jobs", json={"dataset": dataset["id"], "spec": spec}, headers=bearer(alice))
    assert created.status_code == 201, created.get_json()
    job_id = created.get_json()["id"]
    outcome = supervise(job_id, settings, db=runner_db, storage=storage, gpu="cpu")
    assert outcome.state == SUCCEEDED, outcome
    summary = json.loads(storage.local_path(storage.job_key(job_id, SUMMARY)).read_text())
    with h5py.File(digits_h5, "r") as fh:
        x_test, y_test = fh["X_test"][...], fh["Y_test"][...]
    yield Trained(app, settings, job_id, dataset["id"], alice, bob, summary["metrics"], x_test, y_test)
    runner_db.dispose()
    db.dispose()


def _operation(trained: Trained, response: Any) -> dict[str, Any]:
    """The operation a POST started, read back as a client polls it (the stand-in queue ran it already)."""
    assert response.status_code == 202, response.get_json()
    started = response.get_json()
    shown = trained.client.get(response.headers["Location"], headers=bearer(trained.alice))
    assert shown.status_code == 200
    operation = shown.get_json()
    assert operation["id"] == started["id"] and operation["job"] == trained.job_id
    assert operation["state"] == SUCCEEDED, operation
    return operation


def test_evaluate_on_the_test_set_returns_the_accuracy_the_job_reported(trained: Trained) -> None:
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/evaluate", json={"dataset": trained.dataset_id}, headers=bearer(trained.alice)
    )
    result = _operation(trained, response)["result"]
    assert result["split"] == "test" and result["rows"] == len(trained.y_test)
    assert result["metrics"]["accuracy"] == trained.reported["test"]["accuracy"]
    assert result["metrics"]["loss"] == pytest.approx(trained.reported["test"]["loss"], rel=1e-5)


def test_predict_json_then_onnx_runtime_matches_keras_on_the_test_set(trained: Trained) -> None:
    ort = pytest.importorskip("onnxruntime")
    rows = trained.x_test.astype(np.float32)
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict", json={"inputs": rows.tolist()}, headers=bearer(trained.alice)
    )
    result = _operation(trained, response)["result"]
    keras_out = np.asarray(result["predictions"], dtype=np.float32)
    assert keras_out.shape == (len(rows), 10)
    # The predicted classes score the accuracy the job reported on the same rows.
    accuracy = float((np.asarray(result["classes"]) == trained.y_test).mean())
    assert accuracy == pytest.approx(trained.reported["test"]["accuracy"], abs=1e-6)

    # model.onnx was exported at the end of training (output.export in the spec) and is downloadable.
    onnx_file = trained.client.get(f"/v1/jobs/{trained.job_id}/artifacts/{MODEL_ONNX}", headers=bearer(trained.alice))
    assert onnx_file.status_code == 200
    session = ort.InferenceSession(onnx_file.data, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert np.abs(onnx_out - keras_out).max() <= 1e-4


def test_predict_an_hdf5_batch(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "batch.h5"
    with h5py.File(path, "w") as fh:
        fh["X"] = trained.x_test[:5]
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict",
        data=path.read_bytes(),
        headers={**bearer(trained.alice), "Content-Type": "application/x-hdf5"},
    )
    result = _operation(trained, response)["result"]
    assert result["rows"] == 5 and len(result["predictions"]) == 5
    assert np.allclose(np.asarray(result["predictions"]).sum(axis=1), 1.0, atol=1e-5)  # softmax rows


def test_export_afterwards_writes_both_artifacts(trained: Trained) -> None:
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/export",
        json={"formats": ["saved_model", "onnx"]},
        headers=bearer(trained.alice),
    )
    result = _operation(trained, response)["result"]
    assert result["artifacts"] == {"saved_model": SAVED_MODEL_ZIP, "onnx": MODEL_ONNX}
    archive = trained.client.get(
        f"/v1/jobs/{trained.job_id}/artifacts/{SAVED_MODEL_ZIP}", headers=bearer(trained.alice)
    )
    assert archive.status_code == 200 and archive.mimetype == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(archive.data)).namelist()
    assert "saved_model/saved_model.pb" in names


# ── refusals: every one answers before anything runs ──
def test_predict_refuses_rows_of_the_wrong_shape(trained: Trained, tmp_path: Path) -> None:
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict", json={"inputs": [[0.0] * 63]}, headers=bearer(trained.alice)
    )
    body = assert_error_body(response, 422, "shape_mismatch")
    assert body["field"] == "inputs" and "[63]" in body["detail"] and "[64]" in body["detail"]

    path = tmp_path / "wrong.h5"
    with h5py.File(path, "w") as fh:
        fh["X"] = np.zeros((3, 8, 8), np.float32)
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict",
        data=path.read_bytes(),
        headers={**bearer(trained.alice), "Content-Type": "application/x-hdf5"},
    )
    body = assert_error_body(response, 422, "shape_mismatch")
    assert body["field"] == "X" and "[8, 8]" in body["detail"]


def test_predict_refuses_an_hdf5_file_without_x(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "nox.h5"
    with h5py.File(path, "w") as fh:
        fh["inputs"] = np.zeros((3, 64), np.float32)
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict",
        data=path.read_bytes(),
        headers={**bearer(trained.alice), "Content-Type": "application/x-hdf5"},
    )
    body = assert_error_body(response, 422)
    assert body["problems"][0]["code"] == "missing_key" and body["problems"][0]["field"] == "X"


def test_predict_refuses_a_body_over_the_limit(trained: Trained) -> None:
    rows = [[1.0] * 64] * 5000  # about 1.6 MB of JSON; the limit here is 512 KiB
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/predict", json={"inputs": rows}, headers=bearer(trained.alice)
    )
    body = assert_error_body(response, 413)
    assert "max_predict_bytes" in body["detail"]


def test_unknown_or_someone_elses_job_is_not_found(trained: Trained) -> None:
    for job_id, token in (("job_nosuchjob234", trained.alice), (trained.job_id, trained.bob)):
        for path, body in (("evaluate", {"dataset": trained.dataset_id}), ("export", {"formats": ["onnx"]})):
            response = trained.client.post(f"/v1/jobs/{job_id}/{path}", json=body, headers=bearer(token))
            assert_error_body(response, 404, "not_found")
    response = trained.client.get(
        f"/v1/jobs/{trained.job_id}/operations/op_nosuchop2345", headers=bearer(trained.alice)
    )
    assert_error_body(response, 404, "not_found")


def test_a_job_that_has_not_succeeded_is_a_conflict(trained: Trained) -> None:
    db: Database = trained.app.extensions["gpuyard"].db
    owner = db.user_for_token(trained.alice)
    assert owner is not None
    job = db.create_job(
        owner.id, trained.dataset_id, {"name": f"q{uuid.uuid4().hex[:6]}"}, max_active=10, max_attempts=1
    )
    assert job.state == QUEUED
    response = trained.client.post(
        f"/v1/jobs/{job.id}/export", json={"formats": ["onnx"]}, headers=bearer(trained.alice)
    )
    body = assert_error_body(response, 409, "job_not_finished")
    assert "queued" in body["detail"]


def test_evaluate_refuses_a_data_set_of_another_shape_or_split(trained: Trained, digits_image_h5: Path) -> None:
    images = upload(trained.client, trained.alice, digits_image_h5).get_json()
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/evaluate", json={"dataset": images["id"]}, headers=bearer(trained.alice)
    )
    body = assert_error_body(response, 422, "dataset_mismatch")
    assert "[8, 8, 1]" in body["detail"] and "[64]" in body["detail"]
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/evaluate",
        json={"dataset": trained.dataset_id, "split": "val"},
        headers=bearer(trained.alice),
    )
    body = assert_error_body(response, 422, "dataset_mismatch")
    assert body["field"] == "split"
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/evaluate", json={"dataset": "ds_nosuchdata23"}, headers=bearer(trained.alice)
    )
    assert assert_error_body(response, 404)["field"] == "dataset"


def test_export_refuses_an_unknown_format(trained: Trained) -> None:
    response = trained.client.post(
        f"/v1/jobs/{trained.job_id}/export", json={"formats": ["tflite"]}, headers=bearer(trained.alice)
    )
    body = assert_error_body(response, 422)
    assert body["field"] == "formats.0" and "onnx" in body["detail"]


def test_the_cli_evaluates_predicts_and_exports(trained: Trained, tmp_path: Path) -> None:
    server = make_server("127.0.0.1", 0, trained.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api = ["--url", f"http://127.0.0.1:{server.server_port}", "--token", trained.alice]
    runner = CliRunner()
    try:
        done = runner.invoke(gpuyard, ["evaluate", trained.job_id, trained.dataset_id, *api])
        assert done.exit_code == 0, done.output
        assert f"accuracy: {trained.reported['test']['accuracy']:.6g}" in done.output

        batch = tmp_path / "batch.json"
        batch.write_text(json.dumps({"inputs": trained.x_test[:3].tolist()}))
        done = runner.invoke(gpuyard, ["predict", trained.job_id, str(batch), "-o", str(tmp_path / "out.json"), *api])
        assert done.exit_code == 0, done.output
        assert len(json.loads((tmp_path / "out.json").read_text())["classes"]) == 3

        done = runner.invoke(gpuyard, ["export", trained.job_id, "--format", "onnx", "-o", str(tmp_path), *api])
        assert done.exit_code == 0, done.output
        storage = LocalStorage(trained.settings.storage_dir)  # type: ignore[arg-type]
        stored = storage.local_path(storage.job_key(trained.job_id, MODEL_ONNX))
        assert file_sha256(tmp_path / MODEL_ONNX) == file_sha256(stored)

        done = runner.invoke(gpuyard, ["predict", trained.job_id, str(batch), *api, "--url", "http://127.0.0.1:9"])
        assert done.exit_code != 0 and "connection_failed" in done.output
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps([[1.0, 2.0]]))
        done = runner.invoke(gpuyard, ["predict", trained.job_id, str(wrong), *api])
        assert done.exit_code == 1 and "422 shape_mismatch [inputs]" in done.output
    finally:
        server.shutdown()
        thread.join(5)


def test_the_client_says_when_no_worker_takes_an_operation(
    app: Flask, alice: Client, tokens: Tokens, queue: FakeQueue, digits_h5: Path
) -> None:
    """A job made to look succeeded (a model file, its summary.json); the queue takes the operation and
    nothing runs it, as when no CPU worker is up: the client stops at its timeout and says why (about 2 s)."""
    svc = services(app)
    dataset = alice.upload_dataset(digits_h5)
    owner = svc.db.user_for_token(tokens.alice)
    assert owner is not None
    job = svc.db.create_job(owner.id, dataset["id"], {"name": "made"}, max_active=10, max_attempts=1)
    assert svc.db.take_lease(job.id, "test", 60, gpu="cpu") is not None
    assert svc.db.finish_job(job.id, "test", SUCCEEDED)
    folder = svc.storage.local_path(svc.storage.job_key(job.id))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_H5).write_bytes(b"never loaded")
    (folder / SUMMARY).write_text(json.dumps({"dataset": dataset["summary"]}))

    with pytest.raises(ClientError) as raised:
        alice.export(job.id, ["onnx"], timeout_s=0.3)
    assert raised.value.error == "timeout" and "CPU queue" in raised.value.detail
    operation_id = queue.sent[-1]
    assert operation_id.startswith("op_") and queue.queues[operation_id] == svc.settings.train_queue
    assert alice.operation(job.id, operation_id)["state"] == QUEUED

    # Failed with a detail that names a server path (as a child's traceback line may): the API cuts it.
    assert svc.db.start_operation(operation_id) is not None
    svc.db.finish_operation(operation_id, reason="internal_error", detail=f"OSError: {folder / MODEL_H5} is bad")
    with pytest.raises(ClientError) as raised:
        alice.wait_operation(job.id, alice.operation(job.id, operation_id))
    assert (
        raised.value.error == "operation_failed" and "internal_error: OSError: model.h5 is bad" in raised.value.detail
    )
    assert str(folder) not in raised.value.detail
