"""Every example spec's model exports to a self-contained ONNX file that matches Keras on digits.

The exported graph must run in onnxruntime on the input alone (``input_normalization: standardize`` once
left the Normalization's mean and variance as two extra required inputs) and agree with Keras within
1e-4 on the digits test rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from support import digits_summary

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from models.build import build_model, compute_input_stats, needs_input_stats
from models.spec import parse_spec
from worker.trainer.modelops import export_model, load_model

ort = pytest.importorskip("onnxruntime")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "specs"
IMAGE_EXAMPLES = {"resnet_conv", "cnn"}  # meant for digits stored as 8×8×1 images


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (raw 0..16 features): 600 training rows, 360 test rows."""
    from sklearn.datasets import load_digits  # scikit-learn only for this data

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int64")
    return x[:600], y[:600], x[-360:]


def _trained(name: str, digits: tuple[np.ndarray, ...]) -> tuple[Any, np.ndarray]:
    x_train, y_train, x_test = digits
    shape = [8, 8, 1] if name in IMAGE_EXAMPLES else [64]
    x_train, x_test = x_train.reshape(-1, *shape), x_test.reshape(-1, *shape)
    spec = parse_spec(json.loads((EXAMPLES / f"{name}.json").read_text()))
    stats = compute_input_stats(x_train) if needs_input_stats(spec) else None
    model = build_model(spec, digits_summary(shape, len(x_train)), input_stats=stats)
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    return model, x_test


def _onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [graph_input] = session.get_inputs()  # the model's input, nothing else
    return session.run(None, {graph_input.name: x})[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_every_example_exports_a_self_contained_onnx_matching_keras(
    name: str, digits: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    model, x_test = _trained(name, digits)
    written = export_model(model, tmp_path, ["onnx"])
    got = _onnx_outputs(Path(written["onnx"]), x_test)
    expected = model.predict(x_test, verbose=0)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_highway_example_reloaded_from_h5_exports_self_contained(
    digits: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    """The export operation's path: the finished job's model.h5, loaded, then exported."""
    model, x_test = _trained("highway", digits)
    assert any(layer.name == "input_normalization" for layer in model.layers)  # the case that broke
    model.save(tmp_path / "model.h5")
    loaded = load_model(tmp_path / "model.h5")
    written = export_model(loaded, tmp_path, ["onnx"])
    expected = model.predict(x_test, verbose=0)
    np.testing.assert_allclose(_onnx_outputs(Path(written["onnx"]), x_test), expected, atol=1e-4, rtol=0)
