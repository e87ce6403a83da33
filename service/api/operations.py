"""/v1/jobs/<id>/evaluate, /predict, /export: use a succeeded job's model, in a worker, as a small operation.

Each POST checks what it can at once (the job succeeded and is yours, the data set or the inputs have the
model's input shape, the size is bounded), records an operation, sends ``gpuyard.operate(op_id)`` to the CPU
queue and answers 202 with the operation and its ``Location``. A worker runs it in a process of its own
(``worker/operations.py``: TensorFlow never runs in the API); the client polls
``GET /v1/jobs/<id>/operations/<op_id>`` until ``state`` is ``succeeded`` (``result``) or ``failed``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Response, request, url_for

from core.atomicio import atomic_path
from core.errors import Problem
from core.names import MODEL_H5, SUMMARY
from core.states import SUCCEEDED
from models.data.sandbox import check_inputs
from models.data.summary import DatasetSummary
from service.api import json_body, respond
from service.api.datasets import RAW_TYPES
from service.api.declare import HDF5, documented
from service.api.jobs import visible_job
from service.auth import authenticate, current_user, visible_owner_id
from service.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
    scrub_paths,
    server_roots,
)
from service.extensions import services
from service.schemas import EvaluateIn, ExportIn, OperationOut, PredictIn
from store import Job, Operation
from worker.errors import QueueUnavailable
from worker.queues import cpu_queue
from worker.storage import operation_dir

bp = Blueprint("operations", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

#: The HDF5 key of a predict upload's inputs.
PREDICT_KEY = "X"
#: A predict upload's X may hold at most this many times ``max_predict_bytes`` as float32 (it may be compressed).
_DECLARED_FACTOR = 4


@bp.post("/<job_id>/evaluate")
@documented(
    "evaluateJob",
    summary="Measure a succeeded job's model on a data set's split, in a worker; poll the operation",
    body=EvaluateIn,
    responses={202: (OperationOut, "Queued")},
    errors=(400, 401, 404, 409, 422, 503),
)
def evaluate(job_id: str) -> Response:
    """Measure the job's model on a data set's split (default ``test``): its loss and metrics (202)."""
    job = _succeeded_job(job_id)
    body = json_body(EvaluateIn)
    dataset = services().db.get_dataset(body.dataset, visible_owner_id())
    if dataset is None:
        raise NotFound(f"no data set {body.dataset!r}; upload one with POST /v1/datasets", field="dataset")
    summary = DatasetSummary.model_validate(dataset.summary)
    trained = _trained_on(job)
    problems = []
    if summary.input_shape != trained.input_shape:
        problems.append(
            Problem(
                "shape_mismatch",
                f"data set {dataset.id} has rows of shape {summary.input_shape}; expected {trained.input_shape}, "
                f"the input of job {job.id}'s model",
                "dataset",
            )
        )
    if (summary.target, summary.output_dim) != (trained.target, trained.output_dim):
        problems.append(
            Problem(
                "target_mismatch",
                f"data set {dataset.id} has {summary.target} targets with {summary.output_dim} output(s); expected "
                f"{trained.target} with {trained.output_dim}, as job {job.id} was trained on",
                "dataset",
            )
        )
    if body.split not in summary.rows:
        problems.append(
            Problem(
                "missing_split",
                f"data set {dataset.id} has no {body.split!r} split; expected one of: {', '.join(summary.rows)}",
                "split",
            )
        )
    if problems:
        raise Unprocessable.from_problems("dataset_mismatch", problems)
    return _start(job, "evaluate", {"dataset": dataset.id, "split": body.split})


@bp.post("/<job_id>/predict")
@documented(
    "predictJob",
    summary="Predict a small batch (JSON inputs, or HDF5 with X; at most max_predict_bytes) in a worker",
    body=PredictIn,
    body_media={"application/x-hdf5": HDF5},
    responses={202: (OperationOut, "Queued")},
    errors=(400, 401, 404, 409, 413, 415, 422, 503),
)
def predict(job_id: str) -> Response:
    """Predict a small batch (202): JSON ``{"inputs": [[...], ...]}`` or an HDF5 file with an ``X`` dataset
    (raw body, Content-Type application/x-hdf5), at most ``max_predict_bytes``."""
    job = _succeeded_job(job_id)
    svc = services()
    max_bytes = svc.settings.max_predict_bytes
    request.max_content_length = max_bytes  # werkzeug answers 413 past it, before reading the body
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"the request body has {request.content_length} bytes; expected at most {max_bytes} "
            "(max_predict_bytes). For more rows, upload a data set and evaluate, or download the model",
            field="inputs",
        )
    expected = _trained_on(job).input_shape
    if request.mimetype == "application/json":
        inputs = _json_inputs(json_body(PredictIn).inputs, expected)
        return _start(job, "predict", {"rows": int(inputs.shape[0]), "input_file": "input.npy"}, _npy_writer(inputs))
    if request.mimetype not in RAW_TYPES:
        raise UnsupportedMediaType(
            'expected JSON {"inputs": [[...], ...]} (Content-Type: application/json) or an HDF5 file with an '
            f"X dataset (Content-Type: application/x-hdf5). Received: {request.mimetype or 'no Content-Type'}"
        )
    staged = svc.storage.stage_stream(request.stream, max_bytes)
    try:
        array = check_inputs(staged.path, PREDICT_KEY, limits=svc.settings)  # DataError: 422, every reason
        _check_rows(array.shape[1:], array.shape[0], expected, PREDICT_KEY)
        declared = math.prod(array.shape) * 4
        if declared > _DECLARED_FACTOR * max_bytes:
            raise PayloadTooLarge(
                f"{PREDICT_KEY} holds {declared} bytes as float32 (shape {array.shape}); expected at most "
                f"{_DECLARED_FACTOR * max_bytes} ({_DECLARED_FACTOR} × max_predict_bytes)",
                field=PREDICT_KEY,
            )
        return _start(
            job, "predict", {"rows": array.rows, "input_file": "input.h5"}, lambda path: os.replace(staged.path, path)
        )
    finally:
        svc.storage.discard(staged)  # a no-op once moved into the operation's folder


@bp.post("/<job_id>/export")
@documented(
    "exportJob",
    summary="Export a succeeded job's model (model.onnx, saved_model.zip artifacts) in a worker",
    body=ExportIn,
    responses={202: (OperationOut, "Queued")},
    errors=(400, 401, 404, 409, 422, 503),
)
def export(job_id: str) -> Response:
    """Export the job's model (202): ``{"formats": ["onnx", "saved_model"]}`` → artifacts model.onnx,
    saved_model.zip (GET /v1/jobs/<id>/artifacts/<name> once the operation succeeded)."""
    job = _succeeded_job(job_id)
    body = json_body(ExportIn)
    return _start(job, "export", {"formats": list(dict.fromkeys(body.formats))})


@bp.get("/<job_id>/operations/<operation_id>")
@documented(
    "getOperation",
    summary="One model operation: queued, running, succeeded (result) or failed",
    responses={200: OperationOut},
    errors=(401, 404),
)
def show(job_id: str, operation_id: str) -> Response:
    """One operation on the job: its state, and its result once it succeeded."""
    job = visible_job(job_id)
    operation = services().db.get_operation(operation_id, job.id)
    if operation is None:
        raise NotFound(f"no operation {operation_id!r} on job {job.id}")
    return respond(operation_out(operation))


def operation_out(operation: Operation) -> OperationOut:
    """The operation as the API shows it: no server path in its error (a child's detail may name files)."""
    out = OperationOut.of(operation)
    if out.error_detail:
        out.error_detail = scrub_paths(out.error_detail, server_roots(services().settings))
    return out


# ── helpers ──
def _succeeded_job(job_id: str) -> Job:
    job = visible_job(job_id)
    if job.state != SUCCEEDED:
        raise Conflict(
            f"job {job.id} is {job.state}; expected a job that succeeded (its model is written when it does)",
            code="job_not_finished",
            field="job_id",
        )
    storage = services().storage
    if not storage.exists(storage.job_key(job.id, MODEL_H5)):
        raise Conflict(f"job {job.id} has no {MODEL_H5} in storage", code="model_missing", field="job_id")
    return job


def _trained_on(job: Job) -> DatasetSummary:
    """The summary of the data the job trained on, as its summary.json recorded it."""
    storage = services().storage
    try:
        recorded = json.loads(storage.local_path(storage.job_key(job.id, SUMMARY)).read_text())
        return DatasetSummary.model_validate(recorded["dataset"])
    except (OSError, ValueError, KeyError) as exc:
        raise Conflict(f"job {job.id} has no readable {SUMMARY}", code="model_missing", field="job_id") from exc


def _json_inputs(rows: list[Any], expected: list[int]) -> np.ndarray:
    try:
        inputs = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise Unprocessable(
            f"inputs: expected rows of numbers, all of shape {expected} ({exc})", code="bad_inputs", field="inputs"
        ) from exc
    if inputs.ndim < 2:
        raise Unprocessable(
            f"inputs has shape {list(inputs.shape)}; expected a list of rows, each of shape {expected}",
            code="shape_mismatch",
            field="inputs",
        )
    _check_rows(list(inputs.shape[1:]), int(inputs.shape[0]), expected, "inputs")
    if not np.isfinite(inputs).all():
        raise Unprocessable("inputs holds NaN or Inf; expected finite numbers", code="non_finite", field="inputs")
    return inputs


def _check_rows(shape: list[int], rows: int, expected: list[int], field: str) -> None:
    if list(shape) != list(expected):
        raise Unprocessable(
            f"{field} has {rows} row(s) of shape {list(shape)}; expected rows of shape {expected}, the input of "
            "the job's model",
            code="shape_mismatch",
            field=field,
        )


def _npy_writer(inputs: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.save(fh, inputs, allow_pickle=False)

    return write


def _start(job: Job, kind: str, asked: dict[str, Any], place_input: Callable[[Path], None] | None = None) -> Response:
    """Record the operation, put its input in place, send it to the CPU queue; 202 with the operation."""
    svc = services()
    operation = svc.db.create_operation(job.id, current_user().id, kind, asked)
    if place_input is not None:
        folder = operation_dir(svc.storage, job.id, operation.id)
        folder.mkdir(parents=True, exist_ok=True)
        place_input(folder / asked["input_file"])
    try:
        svc.send_operation(operation.id, cpu_queue(svc.settings))
    except QueueUnavailable as exc:
        if svc.db.start_operation(operation.id) is not None:
            svc.db.finish_operation(operation.id, reason="queue_unavailable", detail=str(exc))
        raise ServiceUnavailable(
            f"the job queue is unreachable ({exc}); the operation was not started", code="queue_unavailable"
        ) from exc
    operation = svc.db.get_operation(operation.id) or operation
    location = url_for("operations.show", job_id=job.id, operation_id=operation.id)
    return respond(operation_out(operation), 202, {"Location": location})
