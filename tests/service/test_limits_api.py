"""Model size limits at submit (and at dry run), and the default max_runtime_s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, FakeDryRun, FakeQueue, Tokens, assert_error_body, bearer, upload
from flask.testing import FlaskClient


@pytest.fixture
def dataset_id(client: FlaskClient, tokens: Tokens, digits_h5: Path) -> str:
    return upload(client, tokens.alice, digits_h5).get_json()["id"]


def _submit(client: FlaskClient, token: str, dataset_id: str, spec: Any, query: str = "") -> Any:
    return client.post(f"/v1/jobs{query}", json={"dataset": dataset_id, "spec": spec}, headers=bearer(token))


@pytest.mark.parametrize("query", ["", "?dry_run=1"])
def test_a_width_20000_highway_is_refused_at_submit_and_dry_run(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, dry_run: FakeDryRun, query: str
) -> None:
    spec = {"architecture": {"family": "highway", "depth": 4, "width": 20000}}
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, spec, query), 422, "model_too_large")
    assert body["problems"][0]["field"] == "spec.architecture.depth"
    assert "GPUYARD_MAX_MODEL_PARAMETERS" in body["detail"] and "50,000,000" in body["detail"]
    assert "width=20000" in body["detail"]
    assert queue.sent == [] and dry_run.calls == []  # nothing was built, nothing queued


@pytest.mark.parametrize(
    ("arch", "field"),
    [
        ({"family": "highway", "depth": 100000, "width": 8}, "spec.architecture.depth"),
        ({"family": "highway", "depth": 2, "width": 10**9}, "spec.architecture.width"),
        ({"family": "mlp", "widths": [4] * 100000}, "spec.architecture.widths"),
        ({"family": "mlp", "widths": [2**62]}, "spec.architecture.widths.0"),
    ],
    ids=["depth", "width", "widths-long", "widths-huge"],
)
def test_absurd_sizes_get_422_never_201_or_500(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, arch: dict[str, Any], field: str
) -> None:
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, {"architecture": arch}), 422)
    assert body["problems"][0]["field"] == field
    assert queue.sent == []


def test_a_spec_without_max_runtime_gets_the_default(client, tokens: Tokens, dataset_id: str, settings) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tokens.alice, dataset_id, GOOD_SPEC).get_json()
    assert job["spec"]["resources"]["max_runtime_s"] == settings.default_max_runtime_s == 86400
    own = {**GOOD_SPEC, "resources": {"max_runtime_s": 60}}
    job = _submit(client, tokens.alice, dataset_id, own).get_json()
    assert job["spec"]["resources"]["max_runtime_s"] == 60


def _issue_models() -> dict[str, Any]:
    """The three keras_json models that escaped the size limits at plain submit (issue 20, item 2).

    Built small in Keras and enlarged in the JSON: Keras would allocate the real weights.
    """
    import keras  # the test process may import Keras; the API it tests does not

    layers = keras.layers

    def small(*hidden: Any) -> dict[str, Any]:
        return json.loads(keras.Sequential([keras.Input((64,)), *hidden, layers.Dense(10)]).to_json())

    chain = small(layers.Dense(20), layers.LayerNormalization(), layers.Dense(20))
    for index in (1, 3):
        chain["config"]["layers"][index]["config"]["units"] = 20000
    embedding = small(layers.Embedding(10, 100), layers.Flatten())
    embedding["config"]["layers"][1]["config"]["input_dim"] = 10_000_000
    repeat = small(layers.RepeatVector(3), layers.GlobalAveragePooling1D())
    repeat["config"]["layers"][1]["config"]["n"] = 10_000_000
    return {"dense-layernorm-dense": chain, "embedding": embedding, "repeat-vector": repeat}


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("dense-layernorm-dense", "GPUYARD_MAX_MODEL_PARAMETERS"),
        ("embedding", "GPUYARD_MAX_MODEL_PARAMETERS"),
        ("repeat-vector", "GPUYARD_MAX_TRAINING_MEMORY_BYTES"),
    ],
)
@pytest.mark.parametrize("query", ["", "?dry_run=1"])
def test_keras_json_models_past_the_limits_are_refused_at_submit(  # type: ignore[no-untyped-def]
    client, tokens: Tokens, dataset_id: str, queue: FakeQueue, dry_run: FakeDryRun, name: str, limit: str, query: str
) -> None:
    spec = {"architecture": {"family": "keras_json", "model_json": _issue_models()[name]}}
    body = assert_error_body(_submit(client, tokens.alice, dataset_id, spec, query), 422, "model_too_large")
    assert limit in body["detail"]
    assert body["problems"][0]["field"] in ("spec.architecture.model_json", "spec.training.batch_size")
    assert queue.sent == [] and dry_run.calls == []  # refused before anything was built or queued
