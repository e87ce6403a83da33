"""Deeply nested JSON is refused with 400/422, never a 500 (RecursionError, serializer depth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_helpers import Tokens, assert_error_body, bearer, upload
from flask.testing import FlaskClient

from core.errors import SpecError
from core.jsondepth import MAX_JSON_DEPTH, text_depth, value_depth
from models.spec import parse_spec


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def test_depth_is_measured_without_recursion_and_ignores_brackets_in_strings() -> None:
    assert text_depth('{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert text_depth(r'["\"[", []]') == 2
    assert text_depth("[" * 100_000 + "]" * 100_000) == 100_000
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert value_depth(deep) == 100_001
    assert value_depth(deep, limit=10) == 11
    assert value_depth({"a": [1, {"b": 2}]}) == 3


def test_a_body_nested_1000_deep_gets_400(client: FlaskClient, tokens: Tokens) -> None:
    body = "[" * 1000 + "]" * 1000
    response = client.post("/v1/jobs", data=body, content_type="application/json", headers=bearer(tokens.alice))
    error = assert_error_body(response, 400, "bad_request")
    assert f"at most {MAX_JSON_DEPTH}" in error["detail"] and "1000" in error["detail"]
    nested_spec = '{"dataset": "x", "spec": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}"
    response = client.post("/v1/jobs", data=nested_spec, content_type="application/json", headers=bearer(tokens.alice))
    assert_error_body(response, 400, "bad_request")


def _keras_json(model_json: object) -> dict:
    return {"architecture": {"family": "keras_json", "model_json": model_json}}


def test_a_model_json_string_nested_1000_deep_gets_422(client: FlaskClient, tokens: Tokens, dataset_id: str) -> None:
    deep_text = '{"class_name": "Sequential", "config": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}"
    spec = _keras_json(deep_text)
    response = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": spec}, headers=bearer(tokens.alice))
    error = assert_error_body(response, 422, "spec_invalid")
    assert error["problems"][0]["field"] == "spec.architecture.model_json"
    assert "1001 levels" in error["detail"]


@pytest.mark.parametrize("depth", [300, MAX_JSON_DEPTH])
def test_a_model_json_object_nested_deep_gets_400_or_422(
    client: FlaskClient, tokens: Tokens, dataset_id: str, depth: int
) -> None:
    config: dict = {}
    for _ in range(depth):
        config = {"a": config}
    spec = _keras_json({"class_name": "Sequential", "config": config})
    response = client.post("/v1/jobs", json={"dataset": dataset_id, "spec": spec}, headers=bearer(tokens.alice))
    assert response.status_code in (400, 422), response.get_data(as_text=True)
    assert_error_body(response, response.status_code)


def test_parse_spec_refuses_a_deep_model_json_object_without_recursing() -> None:
    config: dict = {}
    for _ in range(5000):
        config = {"a": config}
    with pytest.raises(SpecError) as caught:
        parse_spec(_keras_json({"class_name": "Sequential", "config": config}))
    assert caught.value.problems[0].code == "keras_json_too_deep"
    assert json.dumps(caught.value.problems[0].to_dict())  # the problem itself is shallow
