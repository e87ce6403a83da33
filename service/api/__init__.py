"""The HTTP API's blueprints (one per resource) and the request/response helpers they share."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Response, current_app, request
from pydantic import BaseModel, ValidationError

from core.errors import Problem
from core.jsondepth import MAX_JSON_DEPTH, text_depth
from service.errors import BadRequest, Unprocessable

BodyT = TypeVar("BodyT", bound=BaseModel)


def respond(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response of a pydantic model, in its documented shape."""
    return current_app.response_class(
        model.model_dump_json(by_alias=True), status=status, headers=headers, mimetype="application/json"
    )


def validation_problems(exc: ValidationError, prefix: str = "") -> list[Problem]:
    """pydantic errors as problems naming the field, the value received and what was expected."""
    problems = []
    for error in exc.errors(include_url=False):
        field = prefix + ".".join(str(part) for part in error["loc"])
        received = "nothing" if error["type"] == "missing" else repr(error.get("input"))[:120]
        problems.append(Problem(error["type"], f"{field}: {error['msg']}. Received: {received}", field or None))
    return problems


def json_body(model: type[BodyT]) -> BodyT:
    """The request's JSON body validated as ``model``.

    Raises:
        BadRequest: the body is not a JSON object, or nests deeper than ``MAX_JSON_DEPTH``.
        Unprocessable: it does not match ``model`` (every problem listed).
    """
    depth = text_depth(request.get_data(cache=True))
    if depth > MAX_JSON_DEPTH:  # before decoding: json.loads recurses, so deep nesting would be a 500
        raise BadRequest(f"the JSON body nests {depth} levels deep; expected at most {MAX_JSON_DEPTH}", field="body")
    data: Any = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object body with Content-Type: application/json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Unprocessable.from_problems("validation_error", validation_problems(exc)) from exc


def query_args(model: type[BodyT], *, ignore: tuple[str, ...] = ()) -> BodyT:
    """The query string validated as ``model`` (unknown parameters are refused, naming them)."""
    args = {key: value for key, value in request.args.items() if key not in ignore}
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise Unprocessable.from_problems("validation_error", validation_problems(exc)) from exc
