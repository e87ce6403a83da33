"""GET /openapi.json: the API's OpenAPI 3.1 document, assembled from the routes' own declarations.

Each API view declares its operation with ``@documented(...)`` (service/api/declare.py): its models, its
answers, its parameters. This module walks the app's URL map, renders each declaration, and takes every
schema from the pydantic models they name. Nothing here lists paths.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.routing import Rule

from models.spec import JobSpec
from service.api.declare import REF, declared_operation, documented, render
from service.schemas import JobCreate, JobEventOut

bp = Blueprint("openapi", __name__)
_CACHE_KEY = "gpuyard.openapi_json"
_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # <name> or <converter:name>
# Documented even where no route names them as a JSON body: the spec users write, the events a stream sends.
_ALWAYS_DOCUMENTED: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (JobSpec, "validation"),
    (JobCreate, "validation"),
    (JobEventOut, "serialization"),
]


@bp.get("/openapi.json")
@documented(
    "openapi",
    summary="This document",
    responses={200: {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}},
    errors=(),
    auth=False,
)
def openapi_json() -> Response:
    """The OpenAPI 3.1 document."""
    app: Flask = current_app
    if _CACHE_KEY not in app.extensions:
        app.extensions[_CACHE_KEY] = json.dumps(openapi_document(app), indent=1)
    return app.response_class(app.extensions[_CACHE_KEY], mimetype="application/json")


def openapi_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``: one operation per declared view, schemas from their models."""
    declared = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        found = declared_operation(view)
        if found is not None:
            declared.append((rule, view, found))
    models = list(_ALWAYS_DOCUMENTED)
    for _, _, found in declared:
        models += [pair for pair in found.models() if pair not in models]
    _, top = models_json_schema(_unique(models), ref_template=REF)
    schemas = _openapi_safe(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for rule, view, found in declared:
        path, args = _openapi_path(rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = render(found, view, args, schemas)
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


def _unique(models: list[tuple[type[BaseModel], JsonSchemaMode]]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    # A model both read and written gets one schema: its validation (request) form.
    seen: dict[type[BaseModel], JsonSchemaMode] = {}
    for model, mode in models:
        if model not in seen or mode == "validation":
            seen[model] = mode
    return list(seen.items())


def _openapi_path(rule: Rule) -> tuple[str, list[str]]:
    """``/v1/jobs/<job_id>`` → ``/v1/jobs/{job_id}``, and the path's arguments in order."""
    args = _ARGUMENT.findall(rule.rule)
    return _ARGUMENT.sub(r"{\1}", rule.rule), args


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
