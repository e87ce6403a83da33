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
