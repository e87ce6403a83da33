"""models/keras_config.py: the Keras-free safe-mode walk of model.to_json() configs."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from typing import Any

import keras
import pytest

from core.errors import SpecError
from models.build import build_model
from models.data.summary import DataKeys, DatasetSummary
from models.keras_config import BUILTIN_LAYERS, NAMESPACE_CLASSES, REFUSED_LAYERS, config_problems
from models.spec import parse_spec


def summary_for(input_shape: list[int]) -> DatasetSummary:
    return DatasetSummary(
        sha256="0" * 64,
        size_bytes=1,
        keys=DataKeys(),
        arrays={},
        rows={"train": 64},
        input_shape=input_shape,
        target="integer_labels",
        num_classes=10,
        output_dim=10,
    )


def functional_json() -> str:
    """A small Functional model of built-in layers with a branch, as model.to_json() writes it."""
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    skip = keras.layers.Dense(16, name="skip")(inputs)
    merged = keras.layers.Add(name="merge")([hidden, skip])
    merged = keras.layers.Dropout(0.1, name="drop")(merged)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(merged)
    return keras.Model(inputs, outputs, name="branchy").to_json()


def test_the_static_class_lists_are_the_installed_keras_ones() -> None:
    layers = {
        name
        for name, obj in vars(keras.layers).items()
        if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer) and name not in REFUSED_LAYERS
    }
    assert layers == BUILTIN_LAYERS
    for module, namespace in (
        ("keras.initializers", keras.initializers),
        ("keras.regularizers", keras.regularizers),
        ("keras.constraints", keras.constraints),
    ):
        assert {n for n, o in vars(namespace).items() if inspect.isclass(o)} == NAMESPACE_CLASSES[module]


def test_the_walk_imports_no_framework() -> None:
    code = "import sys, models.keras_config; assert not {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_functional_to_json_passes_and_builds() -> None:
    model_json = functional_json()
    assert "__keras_tensor__" in model_json
    assert config_problems(json.loads(model_json)) == []
    spec = parse_spec({"architecture": {"family": "keras_json", "model_json": model_json}})
    model = build_model(spec, summary_for([64]))
    assert [layer.name for layer in model.layers] == ["pixels", "hidden", "skip", "merge", "drop", "classes"]


def _with_layer(change: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(functional_json())
    config["config"]["layers"][1].update(change)
    return config


@pytest.mark.parametrize(
    ("config", "code", "words"),
    [
        (_with_layer({"class_name": ["Dense"]}), "keras_json_refused", "class_name must be a string"),
        (_with_layer({"class_name": {"a": 1}}), "keras_json_refused", "not dict"),
        (_with_layer({"class_name": 7}), "keras_json_refused", "not int"),
        (_with_layer({"class_name": "Lambda"}), "keras_json_refused", "Lambda layers run arbitrary"),
        (_with_layer({"class_name": "Evil", "module": "keras.layers"}), "keras_json_refused", "unknown layer"),
        (_with_layer({"module": "os"}), "keras_json_refused", "not a built-in Keras class"),
        (_with_layer({"registered_name": "my>Dense"}), "keras_json_refused", "custom class"),
        (_with_layer({"config": [1, 2]}), "keras_json_invalid", "config.layers[1]"),
        ({"class_name": ["Sequential"], "config": {}}, "keras_json_refused", "class_name must be a string"),
        ({"class_name": "Dense", "module": "keras.layers", "config": {}}, "keras_json_invalid", "Sequential"),
        ({"class_name": "Sequential", "module": "keras", "config": []}, "keras_json_invalid", "'config'"),
        ({"class_name": "Sequential", "module": "keras", "config": {"layers": "x"}}, "keras_json_invalid", "layers"),
        (
            {
                "class_name": "Functional",
                "module": "keras",
                "config": {"layers": [{"class_name": "Dense", "module": "keras.layers", "config": {}}]},
            },
            "keras_json_invalid",
            "input_layers",
        ),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, str) else None,
)
def test_malformed_and_foreign_configs_are_problems_never_exceptions(config: Any, code: str, words: str) -> None:
    problems = config_problems(config)
    assert problems and problems[0].code == code, problems
    assert words in problems[0].detail and problems[0].field == "architecture.model_json"
    spec = parse_spec({"architecture": {"family": "keras_json", "model_json": config}})
    with pytest.raises(SpecError) as caught:  # the builder refuses the same way, before Keras sees it
        build_model(spec, summary_for([64]))
    assert caught.value.problems[0].code == code
