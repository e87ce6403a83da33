"""Every spec in examples/specs parses, dry-runs, builds and trains on sklearn's digits."""

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
from models.dryrun import dry_run
from models.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "specs"
NAMES = ["mlp", "highway", "resnet_dense", "resnet_conv", "snn", "cnn", "keras_json"]
IMAGE_EXAMPLES = {"resnet_conv", "cnn"}  # meant for digits stored as 8×8×1 images


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1797 digits (raw 0..16 features), shuffled, 1437 train and 360 test rows."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int64")
    return x[:1437], y[:1437], x[1437:], y[1437:]


def load(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def test_every_family_has_an_example() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(NAMES)
    families = {load(n)["architecture"]["family"] for n in NAMES}
    assert families == {"mlp", "highway", "resnet", "snn", "cnn", "keras_json"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_example_parses_dry_runs_builds_and_trains(name: str, digits: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, _, _ = digits
    x, y = x_train[:200], y_train[:200]
    summary = digits_summary([8, 8, 1] if name in IMAGE_EXAMPLES else [64], len(x))
    x = x.reshape(-1, *summary.input_shape)
    spec = parse_spec(load(name))
    result = dry_run(load(name), summary)
    assert result["ok"], result["errors"]
    assert result["warnings"] == []
    model = build_model(spec, summary, input_stats=compute_input_stats(x) if needs_input_stats(spec) else None)
    assert result["parameters"]["total"] == model.count_params()
    history = model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert np.isfinite(history.history["loss"][0])
