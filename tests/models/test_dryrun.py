"""dry_run: never raises for a bad spec, reports every error, warns about SNN departures, counts."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from models.data.summary import DataKeys, DatasetSummary
from models.dryrun import dry_run


def summary_for(input_shape: list[int], val: bool = False) -> DatasetSummary:
    rows = {"train": 100, "val": 20} if val else {"train": 100}
    return DatasetSummary(
        sha256="0" * 64,
        size_bytes=1,
        keys=DataKeys(),
        arrays={},
        rows=rows,
        input_shape=input_shape,
        target="integer_labels",
        num_classes=10,
        classes=list(range(10)),
        output_dim=10,
    )


def codes(items: list[dict[str, Any]]) -> set[str]:
    return {item["code"] for item in items}


def test_valid_spec_reports_layers_parameters_and_memory() -> None:
    spec = {"architecture": {"family": "mlp", "widths": [16]}, "training": {"batch_size": 8}}
    result = dry_run(spec, summary_for([64]))
    assert result["ok"] is True and result["errors"] == []
    # Dense 64→16 and 16→10: (64·16 + 16) + (16·10 + 10)
    assert result["parameters"] == {"total": 1210, "trainable": 1210, "non_trainable": 0}
    table = {row["name"]: row for row in result["layers"]}
    assert table["dense1_dense"] == {
        "name": "dense1_dense",
        "class": "Dense",
        "output_shape": [None, 16],
        "parameters": 1040,
    }
    assert table["output"]["output_shape"] == [None, 10]
    memory = result["memory_estimate_bytes"]
    assert memory["weights"] == 1210 * 4 and memory["gradients"] == 1210 * 4
    assert memory["optimizer_state"] == 2 * 1210 * 4  # adam: two slots per weight
    assert memory["total"] == sum(
        memory[k] for k in ("weights", "gradients", "optimizer_state", "input_batch", "activations_per_batch")
    )
    assert memory["batch_size"] == 8


def test_sgd_without_momentum_keeps_no_optimizer_state() -> None:
    spec = {"architecture": {"family": "mlp", "widths": [4]}, "training": {"optimizer": {"name": "sgd"}}}
    assert dry_run(spec, summary_for([64]))["memory_estimate_bytes"]["optimizer_state"] == 0


@pytest.mark.parametrize("spec", [None, [], "mlp", {"architecture": "mlp"}, {}])
def test_never_raises_for_garbage(spec: Any) -> None:
    result = dry_run(spec, summary_for([64]))
    assert result["ok"] is False and result["errors"]
    assert result["parameters"] is None and result["layers"] == []


def test_reports_every_parse_error() -> None:
    spec = {"architecture": {"family": "mlp", "widths": [0]}, "training": {"epochs": 0}, "loss": "nope"}
    result = dry_run(spec, summary_for([64]))
    assert {e["field"] for e in result["errors"]} == {"architecture.widths.0", "training.epochs", "loss"}


def test_reports_every_semantic_error() -> None:
    spec = {"architecture": {"family": "cnn"}, "output": {"units": 4}, "loss": "categorical_crossentropy"}
    result = dry_run(spec, summary_for([64]))
    assert result["ok"] is False
    assert [e["field"] for e in result["errors"]] == ["architecture.family", "output.units", "loss"]


def test_snn_warns_about_batch_norm_dropout_and_relu() -> None:
    spec = {
        "architecture": {
            "family": "snn",
            "widths": [16],
            "batch_norm": True,
            "dropout": 0.2,
            "activation": "relu",
            "kernel_initializer": "he_normal",
        }
    }
    result = dry_run(spec, summary_for([64]))
    assert result["ok"] is True
    assert codes(result["warnings"]) == {"snn_batch_norm", "snn_dropout", "snn_activation", "snn_initializer"}
    assert all("Received:" in w["detail"] for w in result["warnings"])


def test_plain_snn_has_no_warnings_and_normalizes() -> None:
    result = dry_run({"architecture": {"family": "snn", "widths": [16]}}, summary_for([64]))
    assert result["ok"] is True and result["warnings"] == []
    assert result["layers"][1]["class"] == "Normalization"
    assert "AlphaDropout" in {row["class"] for row in result["layers"]}


def test_warns_when_the_files_validation_set_wins() -> None:
    spec = {"architecture": {"family": "mlp", "widths": [4]}, "training": {"validation_split": 0.2}}
    assert "validation_split_ignored" in codes(dry_run(spec, summary_for([64], val=True))["warnings"])
    stopping = {"architecture": {"family": "mlp", "widths": [4]}, "training": {"early_stopping": {}}}
    assert "no_validation_data" in codes(dry_run(stopping, summary_for([64]))["warnings"])


def test_without_data_uses_declared_shapes() -> None:
    spec = {
        "architecture": {"family": "cnn", "filters": [4], "dense_units": 8, "input_shape": [8, 8, 1]},
        "output": {"units": 10},
    }
    result = dry_run(spec, None)
    assert result["ok"] is True and "no_data" in codes(result["warnings"])
    assert result["layers"][0]["output_shape"] == [None, 8, 8, 1]


def test_without_data_or_declared_shapes_asks_for_them() -> None:
    result = dry_run({"architecture": {"family": "mlp", "widths": [4]}}, None)
    assert result["ok"] is False
    assert {e["field"] for e in result["errors"]} == {"architecture.input_shape", "output.units"}
    assert codes(result["errors"]) == {"data_needed"}


def test_keras_json_refusal_is_an_error_not_an_exception() -> None:
    model_json = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "m",
            "layers": [
                {
                    "module": "keras.layers",
                    "class_name": "InputLayer",
                    "config": {"batch_shape": [None, 64], "name": "in"},
                },
                {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "evil", "function": "x"}},
            ],
        },
    }
    result = dry_run({"architecture": {"family": "keras_json", "model_json": model_json}}, summary_for([64]))
    assert result["ok"] is False and "'evil'" in result["errors"][0]["detail"]


def test_the_dry_run_reports_the_submit_estimate_for_keras_json() -> None:
    """Submit (models.size, no Keras) and the dry run (the built model) give one memory number."""
    import json

    import keras

    from models.size import estimated_training_bytes, model_size
    from models.spec import parse_spec

    inputs = keras.Input((16, 4))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inputs, inputs)
    normed = keras.layers.LayerNormalization()(keras.layers.Dense(32)(attended))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling1D()(normed))
    model_json = json.loads(keras.Model(inputs, outputs).to_json())
    spec = {"architecture": {"family": "keras_json", "model_json": model_json}, "training": {"batch_size": 8}}
    result = dry_run(spec, summary_for([16, 4]))
    assert result["ok"] is True, result["errors"]
    size = model_size(parse_spec(spec), [16, 4], 10)
    assert size is not None and size.parameters == result["parameters"]["total"]
    assert result["memory_estimate_bytes"]["total"] == estimated_training_bytes(parse_spec(spec), size)
    # the attention scores (2 heads × 16 × 16, and their softmax) are in it, though no layer outputs them
    assert result["memory_estimate_bytes"]["activations_per_batch"] >= 2 * 8 * 4 * (2 * 2 * 16 * 16)
