"""keras_json at submit: a Functional to_json() is accepted; foreign or malformed configs get 422 there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import pytest
from api_helpers import FakeQueue, Tokens, assert_error_body, bearer, upload
from flask.testing import FlaskClient


@pytest.fixture(scope="module")
def functional_json() -> str:
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    skip = keras.layers.Dense(16, name="skip")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(keras.layers.Add()([hidden, skip]))
    return keras.Model(inputs, outputs).to_json()


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _submit(client: FlaskClient, token: str, dataset_id: str, model_json: Any) -> Any:
    spec = {"architecture": {"family": "keras_json", "model_json": model_json}}
    return client.post("/v1/jobs", json={"dataset": dataset_id, "spec": spec}, headers=bearer(token))


def test_a_functional_to_json_is_accepted(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, functional_json: str
) -> None:
    response = _submit(client, tokens.alice, dataset_id, functional_json)
    assert response.status_code == 201, response.get_json()
    assert queue.sent == [response.get_json()["id"]]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"class_name": "Lambda"}, "keras_json_refused"),
        ({"class_name": ["Dense"]}, "keras_json_refused"),
        ({"class_name": "Sneaky", "module": "mylab.layers"}, "keras_json_refused"),
        ({"config": "not an object"}, "keras_json_invalid"),
    ],
)
def test_foreign_and_malformed_configs_get_422_at_submit(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, functional_json: str, change: dict, code: str
) -> None:
    config = json.loads(functional_json)
    config["config"]["layers"][1].update(change)
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, config), 422, "spec_invalid")
    assert body["problems"][0]["code"] == code
    assert body["problems"][0]["field"] == "spec.architecture.model_json"
    assert queue.sent == []


def _two_inputs() -> str:
    first, second = keras.Input((64,), name="a"), keras.Input((64,), name="b")
    return keras.Model([first, second], keras.layers.Dense(10)(keras.layers.Add()([first, second]))).to_json()


def _wrong_output() -> str:
    inputs = keras.Input((64,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs)).to_json()


def _wrong_input() -> str:
    inputs = keras.Input((32,))
    return keras.Model(inputs, keras.layers.Dense(10)(inputs)).to_json()


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (_two_inputs, "keras_json_invalid", "one input and one output"),
        (_wrong_output, "output_mismatch", "[10]"),
        (_wrong_input, "input_shape_mismatch", "[64]"),
    ],
    ids=["two-inputs", "output", "input"],
)
def test_what_the_trainer_would_refuse_is_refused_at_submit(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, make: Any, code: str, words: str
) -> None:
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, make()), 422, "spec_invalid")
    assert body["problems"][0]["code"] == code and words in body["problems"][0]["detail"]
    assert queue.sent == []
