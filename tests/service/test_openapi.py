"""GET /openapi.json: a valid OpenAPI 3.1 document built from the models the API serves."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from service.schemas import JobOut


def test_openapi_is_valid_3_1(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/openapi.json")  # no token needed
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on an invalid document


def test_openapi_covers_every_route_and_model(client, app) -> None:  # type: ignore[no-untyped-def]
    document = client.get("/openapi.json").get_json()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.partition(".")[0] in ("ui", "root"):
            continue  # the dashboard's HTML pages are not part of the API
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in document["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in document["paths"][path], (path, method)
    schemas = document["components"]["schemas"]
    assert {"JobSpec", "JobCreate", "JobOut", "DatasetOut", "ErrorOut", "DatasetSummary"} <= set(schemas)
    assert set(JobOut.model_fields) == set(schemas["JobOut"]["properties"])
    assert schemas["JobCreate"]["properties"]["spec"]["allOf"] == [{"$ref": "#/components/schemas/JobSpec"}]


@pytest.mark.parametrize("path", ["/v1/health", "/v1/ready", "/openapi.json"])
def test_public_endpoints_need_no_security(client, path: str) -> None:  # type: ignore[no-untyped-def]
    document = client.get("/openapi.json").get_json()
    assert document["paths"][path]["get"]["security"] == []


def test_a_new_route_is_documented_by_its_own_declaration(app) -> None:  # type: ignore[no-untyped-def]
    from flask import Blueprint
    from pydantic import BaseModel

    from service.api.declare import documented
    from service.api.openapi import openapi_document

    class PingIn(BaseModel):
        message: str

    class PingOut(BaseModel):
        echoed: str

    extra = Blueprint("extra_for_test", __name__, url_prefix="/v1/ping")

    @extra.post("/<ping_id>")
    @documented("ping", body=PingIn, responses={200: PingOut}, errors=(401, 422))
    def ping(ping_id: str) -> str:
        """Echo a message back."""
        return ping_id

    app.register_blueprint(extra)
    operation = openapi_document(app)["paths"]["/v1/ping/{ping_id}"]["post"]
    assert operation["operationId"] == "ping" and operation["summary"] == "Echo a message back"
    path_param = {"name": "ping_id", "in": "path", "required": True, "schema": {"type": "string"}}
    assert operation["parameters"] == [path_param]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PingIn"}
    assert set(operation["responses"]) == {"200", "401", "422", "431"}
    assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")


def test_query_parameters_come_from_the_query_model(client) -> None:  # type: ignore[no-untyped-def]
    operation = client.get("/openapi.json").get_json()["paths"]["/v1/jobs"]["get"]
    limit = next(p for p in operation["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}
    state = next(p for p in operation["parameters"] if p["name"] == "state")
    assert "null" not in str(state["schema"])
    schema = state["schema"]
    if "$ref" in schema:  # the job states are one named component (core.states.JobState)
        document = client.get("/openapi.json").get_json()
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    assert "queued" in schema["enum"]
