"""GET /openapi.json: the API's OpenAPI 3.1 document, generated from the same pydantic models it serves."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response, current_app
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.names import ARTIFACT_MEDIA_TYPES, ARTIFACT_NAMES
from models.spec import JobSpec
from service.schemas import (
    DatasetListOut,
    DatasetOut,
    DryRunOut,
    ErrorOut,
    EvaluateIn,
    ExportIn,
    GpuListOut,
    GpuOut,
    HealthOut,
    JobCreate,
    JobEventOut,
    JobListOut,
    JobOut,
    NotifyIn,
    OperationOut,
    PredictIn,
    QuotaOut,
    ReadyOut,
    UsageOut,
    UsageRowOut,
    UserOut,
    WebhookSecretOut,
)

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "Malformed request",
    "401": "Missing or invalid bearer token",
    "403": "Admins only",
    "404": "No such resource, or not yours",
    "409": "Conflict with the resource's state (e.g. the job has not succeeded)",
    "413": "Upload larger than max_upload_bytes",
    "415": "Unsupported Content-Type",
    "422": "Invalid input; `problems` lists every problem",
    "429": "Too many queued + running jobs, or dry runs at once; Retry-After says when to try again",
    "431": "Request header fields too large (more than 8190 bytes per field, 32 KiB in all, or 100 fields)",
    "503": "Database or queue unavailable",
}


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3.1 document."""
    return current_app.response_class(_document_json(), mimetype="application/json")


@lru_cache(maxsize=1)
def _document_json() -> str:
    return json.dumps(openapi_document(), indent=1)


def openapi_document() -> dict[str, Any]:
    """Build the OpenAPI 3.1 document: paths by hand, every schema from the pydantic models."""
    models: list[tuple[type[BaseModel], Any]] = [
        (JobSpec, "validation"),
        (JobCreate, "validation"),
        (ErrorOut, "serialization"),
        (HealthOut, "serialization"),
        (ReadyOut, "serialization"),
        (DatasetOut, "serialization"),
        (DatasetListOut, "serialization"),
        (JobOut, "serialization"),
        (JobListOut, "serialization"),
        (DryRunOut, "serialization"),
        (JobEventOut, "serialization"),
        (GpuOut, "serialization"),
        (GpuListOut, "serialization"),
        (NotifyIn, "validation"),
        (UserOut, "serialization"),
        (QuotaOut, "serialization"),
        (UsageOut, "serialization"),
        (UsageRowOut, "serialization"),
        (WebhookSecretOut, "serialization"),
        (EvaluateIn, "validation"),
        (PredictIn, "validation"),
        (ExportIn, "validation"),
        (OperationOut, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=REF)
    schemas = _openapi_safe(top.get("$defs", {}))

    paths: dict[str, Any] = {
        "/v1/health": {"get": _op("health", "Liveness", {"200": _json("HealthOut")}, auth=False, errors=())},
        "/v1/ready": {
            "get": _op(
                "ready",
                "Readiness: the database and Redis answer",
                {"200": _json("ReadyOut"), "503": _json("ReadyOut", "Something is unreachable")},
                auth=False,
                errors=(),
            )
        },
        "/v1/datasets": {
            "get": _op("listDatasets", "Your data sets (an admin's: everyone's)", {"200": _json("DatasetListOut")}),
            "post": _op(
                "uploadDataset",
                "Upload an HDF5 data set (raw body or multipart field `file`); 200 when you already have it",
                {"201": _json("DatasetOut", "Stored"), "200": _json("DatasetOut", "Already yours")},
                errors=("400", "401", "413", "415", "422"),
                params=[_query(n, "string", f"HDF5 key of {n}") for n in ("x_train", "y_train", "x_test", "y_test")]
                + [_query("name", "string", "A name to remember the upload by")],
                body={
                    "required": True,
                    "content": {
                        "application/x-hdf5": {"schema": {"type": "string", "contentMediaType": "application/x-hdf5"}},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"file": {"type": "string", "contentMediaType": "application/x-hdf5"}},
                                "required": ["file"],
                            }
                        },
                    },
                },
            ),
        },
        "/v1/datasets/{dataset_id}": {
            "parameters": [_path("dataset_id")],
            "get": _op("getDataset", "One data set", {"200": _json("DatasetOut")}, errors=("401", "404")),
            "delete": _op(
                "deleteDataset",
                "Delete a data set (409 while a queued or running job uses it)",
                {"204": {"description": "Deleted"}, "409": _json("ErrorOut", "In use")},
                errors=("401", "404"),
            ),
        },
        "/v1/jobs": {
            "get": _op(
                "listJobs",
                "Your jobs, newest first",
                {"200": _json("JobListOut")},
                errors=("401", "422"),
                params=[
                    _query("state", "string", "Only jobs in this state"),
                    _query("limit", "integer", "Jobs per page (1-200, default 50)"),
                    _query("cursor", "string", "The previous page's next_cursor"),
                ],
            ),
            "post": _op(
                "submitJob",
                "Queue a job; with ?dry_run=1 report what it would build and queue nothing",
                {"201": _json("JobOut", "Queued"), "200": _json("DryRunOut", "Dry run")},
                errors=("400", "401", "404", "422", "429", "503"),
                params=[_query("dry_run", "boolean", "Check and build only; queue nothing")],
                body={
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(model="JobCreate")}}},
                },
            ),
        },
        "/v1/jobs/{job_id}": {
            "parameters": [_path("job_id")],
            "get": _op("getJob", "One job", {"200": _json("JobOut")}, errors=("401", "404")),
        },
        "/v1/gpus": {
            "get": _op(
                "listGpus", "Every registered GPU: state, memory, jobs, foreign processes", {"200": _json("GpuListOut")}
            ),
        },
        **{
            f"/v1/gpus/{{uuid}}/{action}": {
                "parameters": [_path("uuid")],
                "post": _op(f"{action}Gpu", summary, {"200": _json("GpuOut")}, errors=("401", "403", "404")),
            }
            for action, summary in (
                ("drain", "Drain a GPU: running jobs finish, no new ones start (admin)"),
                ("undrain", "Let a drained GPU take jobs again (admin)"),
                ("clear", "Clear a GPU's quarantine (admin)"),
            )
        },
        "/v1/users/me": {
            "get": _op(
                "getMe", "Your account: default notify URLs, whether a webhook secret exists", {"200": _json("UserOut")}
            ),
        },
        "/v1/usage": {
            "get": {
                **_op(
                    "getUsage",
                    "GPU time (memory fraction × seconds) from the jobs' attempts; admins see everyone's",
                    {"200": _json("UsageOut")},
                    errors=("400", "401"),
                ),
                "parameters": [
                    _query("from", "string", "Start, ISO 8601 (default: 30 days before `to`)."),
                    _query("to", "string", "End, ISO 8601 (default: now)."),
                    _query("group_by", "string", "user, day or gpu (default user)."),
                ],
            },
        },
        "/v1/users/me/notify": {
            "put": _op(
                "setMyNotify",
                "Set the notify URLs of your jobs that name none ([] for none)",
                {"200": _json("UserOut")},
                errors=("400", "401", "422"),
                body={
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(model="NotifyIn")}}},
                },
            ),
        },
        "/v1/users/me/webhook-secret": {
            "post": _op(
                "rotateWebhookSecret",
                "Create a new webhook signing secret, shown this once (the old one stops signing at once)",
                {"201": _json("WebhookSecretOut", "Created")},
            ),
        },
        "/v1/jobs/{job_id}/cancel": {
            "parameters": [_path("job_id")],
            "post": _op("cancelJob", "Cancel a job", {"200": _json("JobOut")}, errors=("401", "404")),
        },
        "/v1/jobs/{job_id}/events": {
            "parameters": [_path("job_id")],
            "get": _op(
                "jobEvents",
                "Server-Sent Events, replayed then live; `id:` is the sequence number, resume with Last-Event-ID",
                {
                    "200": {
                        "description": "text/event-stream; each `data:` is a JobEventOut.event object",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                errors=("401", "404", "422"),
                params=[
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer"},
                    },
                    _query("last_event_id", "integer", "Same as the Last-Event-ID header"),
                ],
            ),
        },
        "/v1/jobs/{job_id}/logs": {
            "parameters": [_path("job_id")],
            "get": _op(
                "jobLogs",
                "The trainer's log (stderr); supports Range",
                {
                    "200": {
                        "description": "Log text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                errors=("401", "404"),
            ),
        },
        "/v1/jobs/{job_id}/artifacts/{name}": {
            "parameters": [
                _path("job_id"),
                {"name": "name", "in": "path", "required": True, "schema": {"enum": list(ARTIFACT_NAMES)}},
            ],
            "get": _op(
                "jobArtifact",
                "Download an artifact; ETag is its SHA-256; supports If-None-Match and Range",
                {
                    "200": {
                        "description": "The file: "
                        + ", ".join(f"{name} as {media}" for name, media in ARTIFACT_MEDIA_TYPES.items()),
                        "content": {media: {"schema": {}} for media in sorted(set(ARTIFACT_MEDIA_TYPES.values()))},
                    },
                    "206": {"description": "Partial content (Range)"},
                    "304": {"description": "Not modified (If-None-Match)"},
                },
                errors=("401", "404"),
            ),
        },
        "/v1/jobs/{job_id}/evaluate": {
            "parameters": [_path("job_id")],
            "post": _op(
                "evaluateJob",
                "Measure a succeeded job's model on a data set's split, in a worker; poll the operation",
                {"202": _json("OperationOut", "Queued")},
                errors=("400", "401", "404", "409", "422", "503"),
                body=_json_body("EvaluateIn"),
            ),
        },
        "/v1/jobs/{job_id}/predict": {
            "parameters": [_path("job_id")],
            "post": _op(
                "predictJob",
                "Predict a small batch (JSON inputs, or HDF5 with X; at most max_predict_bytes) in a worker",
                {"202": _json("OperationOut", "Queued")},
                errors=("400", "401", "404", "409", "413", "415", "422", "503"),
                body={
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="PredictIn")}},
                        "application/x-hdf5": {"schema": {"type": "string", "contentMediaType": "application/x-hdf5"}},
                    },
                },
            ),
        },
        "/v1/jobs/{job_id}/export": {
            "parameters": [_path("job_id")],
            "post": _op(
                "exportJob",
                "Export a succeeded job's model (model.onnx, saved_model.zip artifacts) in a worker",
                {"202": _json("OperationOut", "Queued")},
                errors=("400", "401", "404", "409", "422", "503"),
                body=_json_body("ExportIn"),
            ),
        },
        "/v1/jobs/{job_id}/operations/{operation_id}": {
            "parameters": [_path("job_id"), _path("operation_id")],
            "get": _op(
                "getOperation",
                "One model operation: queued, running, succeeded (result) or failed",
                {"200": _json("OperationOut")},
                errors=("401", "404"),
            ),
        },
        "/metrics": {
            "get": _op(
                "metrics",
                "Prometheus metrics (text format): jobs by state, queue, waits, durations, GPUs, API latency; "
                "loopback scrapers, or Bearer GPUYARD_METRICS_TOKEN",
                {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                auth=False,
                errors=("403",),
            )
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "This document",
                {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}},
                auth=False,
                errors=(),
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpuyard",
            "version": "1",
            "description": "Train Keras models on shared GPUs from HDF5 data sets. Errors: ErrorOut.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _openapi_safe(node: Any) -> Any:
    """Drop discriminator mapping entries that are not strings.

    pydantic writes a nested tagged union (``family: resnet`` → ``variant: dense|conv``) as a mapping
    to a whole schema, which OpenAPI forbids; ``oneOf`` still says everything, the mapping is a hint.
    """
    if isinstance(node, list):
        return [_openapi_safe(item) for item in node]
    if not isinstance(node, dict):
        return node
    cleaned = {key: _openapi_safe(value) for key, value in node.items()}
    discriminator = cleaned.get("discriminator")
    if isinstance(discriminator, dict) and isinstance(discriminator.get("mapping"), dict):
        mapping = {k: v for k, v in discriminator["mapping"].items() if isinstance(v, str)}
        cleaned["discriminator"] = {**discriminator, "mapping": mapping}
        if not mapping:
            del cleaned["discriminator"]["mapping"]
    return cleaned


def _json(model: str, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}},
    }


def _json_body(model: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


def _query(name: str, type_: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": type_},
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _op(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    auth: bool = True,
    errors: tuple[str, ...] = ("401",),
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": dict(responses),
    }
    for status in (*errors, "431"):  # every request passes the app's header limits (service/app.py)
        operation["responses"].setdefault(status, _json("ErrorOut", _ERRORS[status]))
    if "429" in operation["responses"]:
        operation["responses"]["429"]["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    if not auth:
        operation["security"] = []
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = body
    return operation
