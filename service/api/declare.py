"""How a route declares itself in the OpenAPI document: the ``@documented(...)`` decorator.

Each API view carries its own declaration, next to its code; ``service/api/openapi.py`` walks the app's URL
map and assembles the document from them (a route without one is missing from it, and a test says so)::

    @bp.post("/<job_id>/evaluate")
    @documented("evaluateJob", body=EvaluateIn, responses={202: (OperationOut, "Queued")},
               errors=(400, 401, 404, 409, 422, 503))
    def evaluate(job_id: str) -> Response:
        \"\"\"Measure a succeeded job's model on a data set's split, in a worker; poll the operation.\"\"\"

The declaration only describes: the view is returned unchanged (its validation, its error bodies and
its streamed answers stay the view's own). The summary is the docstring's first line unless given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from service.schemas import ErrorOut

ATTRIBUTE = "__openapi_operation__"
REF = "#/components/schemas/{model}"
ALWAYS = ("431",)  # every request passes the app's header limits (service/app.py)
ERRORS = {
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
HDF5 = {"schema": {"type": "string", "contentMediaType": "application/x-hdf5"}}
TEXT = {"schema": {"type": "string"}}

# A response: a model (JSON, "OK"), (model, description), or a raw OpenAPI response object.
Reply = type[BaseModel] | tuple[type[BaseModel], str] | dict[str, Any]
ViewT = TypeVar("ViewT", bound=Callable[..., Any])


@dataclass(frozen=True)
class Operation:
    """One route's declaration (see :func:`documented`)."""

    operation_id: str
    summary: str | None
    responses: Mapping[int, Reply]
    body: type[BaseModel] | None = None
    body_media: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    query: type[BaseModel] | None = None
    params: tuple[dict[str, Any], ...] = ()
    path: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = (401,)
    auth: bool = True

    def models(self) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
        """The pydantic models it names, with their JSON Schema mode (requests: validation)."""
        found: list[tuple[type[BaseModel], JsonSchemaMode]] = []
        for request_model in (self.body, self.query):
            if request_model is not None:
                found.append((request_model, "validation"))
        for reply in self.responses.values():
            model = reply[0] if isinstance(reply, tuple) else reply
            if isinstance(model, type):
                found.append((model, "serialization"))
        found.append((ErrorOut, "serialization"))
        return found


def documented(
    operation_id: str,
    *,
    responses: Mapping[int, Reply],
    summary: str | None = None,
    body: type[BaseModel] | None = None,
    body_media: Mapping[str, dict[str, Any]] | None = None,
    query: type[BaseModel] | None = None,
    params: tuple[dict[str, Any], ...] = (),
    path: Mapping[str, dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (401,),
    auth: bool = True,
) -> Callable[[ViewT], ViewT]:
    """Declare a view's operation for the OpenAPI document; the view itself is returned unchanged.

    Args:
        operation_id: the operationId (camelCase, unique).
        responses: status → model, (model, description) or a raw OpenAPI response object.
        summary: one line; default: the view's docstring's first line.
        body: the JSON request body's model (required).
        body_media: other media types the body may have (``{"application/x-hdf5": HDF5}``).
        query: the query string's model: one parameter per field.
        params: other parameters, as OpenAPI parameter objects (headers, flags read by hand).
        path: schemas of path parameters (default: a string each).
        errors: the error statuses it answers with an ErrorOut body (431 is always added).
        auth: whether it needs the bearer token.
    """
    declared = Operation(
        operation_id=operation_id,
        summary=summary,
        responses=dict(responses),
        body=body,
        body_media=dict(body_media or {}),
        query=query,
        params=tuple(params),
        path=dict(path or {}),
        errors=tuple(errors),
        auth=auth,
    )

    def mark(view: ViewT) -> ViewT:
        setattr(view, ATTRIBUTE, declared)
        return view

    return mark


def declared_operation(view: Callable[..., Any]) -> Operation | None:
    """The declaration a view carries, if any."""
    return getattr(view, ATTRIBUTE, None)


def query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A query parameter read by hand (not through a query model)."""
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def render(
    declared: Operation, view: Callable[..., Any], path_args: list[str], schemas: dict[str, Any]
) -> dict[str, Any]:
    """The OpenAPI operation object of one declaration (``schemas``: the components, for query models)."""
    summary = declared.summary or (view.__doc__ or "").strip().splitlines()[0].rstrip(".")
    result: dict[str, Any] = {"operationId": declared.operation_id, "summary": summary, "responses": {}}
    for status, reply in declared.responses.items():
        result["responses"][str(status)] = _response(reply)
    for error in (*(str(s) for s in declared.errors), *ALWAYS):
        result["responses"].setdefault(error, _json(ErrorOut, ERRORS[error]))
    if "429" in result["responses"]:
        result["responses"]["429"]["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    if not declared.auth:
        result["security"] = []
    parameters = [
        {"name": arg, "in": "path", "required": True, "schema": declared.path.get(arg, {"type": "string"})}
        for arg in path_args
    ]
    if declared.query is not None:
        parameters += _query_params(schemas[declared.query.__name__])
    parameters += list(declared.params)
    if parameters:
        result["parameters"] = parameters
    if declared.body is not None:
        content = {"application/json": {"schema": {"$ref": REF.format(model=declared.body.__name__)}}}
        result["requestBody"] = {"required": True, "content": {**content, **declared.body_media}}
    elif declared.body_media:
        result["requestBody"] = {"required": True, "content": dict(declared.body_media)}
    return result


def _json(model: type[BaseModel], description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }


def _response(reply: Reply) -> dict[str, Any]:
    if isinstance(reply, dict):
        return dict(reply)
    if isinstance(reply, tuple):
        return _json(reply[0], reply[1])
    return _json(reply)


def _query_params(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """One parameter per property of a query model's schema; an optional one is never sent as null."""
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        branches = prop.get("anyOf")
        if isinstance(branches, list) and {"type": "null"} in branches:
            kept = [b for b in branches if b != {"type": "null"}]
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            prop = {**kept[0], **rest} if len(kept) == 1 else {**rest, "anyOf": kept}
            if prop.get("default") is None:
                prop.pop("default", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params
