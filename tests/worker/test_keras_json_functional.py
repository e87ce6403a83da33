"""A Functional model's model.to_json() trains through the trainer CLI, as the README promises."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
from trainer_helpers import run_trainer, write_spec

from core.names import MODEL_H5


@pytest.mark.slow
def test_a_functional_to_json_trains(tmp_path: Path, small_digits_h5: Path) -> None:
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    skip = keras.layers.Dense(16, name="skip")(inputs)
    merged = keras.layers.Add(name="merge")([hidden, skip])
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(merged)
    model_json = keras.Model(inputs, outputs, name="branchy").to_json()
    spec = {"architecture": {"family": "keras_json", "model_json": model_json}, "training": {"epochs": 1}}

    run = run_trainer(write_spec(tmp_path / "spec.json", spec), small_digits_h5, tmp_path / "out")

    assert run.returncode == 0, run.stderr[-3000:]
    assert run.of("finished")
    reloaded = keras.models.load_model(tmp_path / "out" / MODEL_H5)
    assert [layer.name for layer in reloaded.layers] == ["pixels", "hidden", "skip", "merge", "classes"]
