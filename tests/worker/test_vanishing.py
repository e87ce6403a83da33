"""The vanishing-gradient demonstration, read from the trainer's own diagnostics.json (epoch 0).

A 20-layer sigmoid MLP's first layer gets a gradient orders of magnitude smaller than its last hidden
layer; highway (sigmoid too: the gates carry the gradient), ResNet (dense, the family's relu) and SNN
networks of the same depth keep first and last within 10×.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import run_trainer, write_spec

DEPTH = 20
ARCHITECTURES = {
    "mlp": {"family": "mlp", "widths": [32] * DEPTH, "activation": "sigmoid"},
    "highway": {"family": "highway", "depth": DEPTH, "width": 32, "activation": "sigmoid"},
    "resnet": {"family": "resnet", "variant": "dense", "blocks": DEPTH // 2, "width": 32},
    "snn": {"family": "snn", "widths": [32] * DEPTH},
}


@pytest.fixture(scope="module")
def first_last_ratio(tmp_path_factory: pytest.TempPathFactory, small_digits_h5: Path) -> dict[str, float]:
    """Family → gradient norm of the last hidden block / that of the first block with weights."""
    root = tmp_path_factory.mktemp("vanishing")
    ratios = {}
    for name, architecture in ARCHITECTURES.items():
        spec = {"name": f"deep-{name}", "architecture": architecture, "training": {"epochs": 1, "batch_size": 100}}
        out = root / name
        run = run_trainer(write_spec(root / f"{name}.json", spec), small_digits_h5, out)
        assert run.returncode == 0, run.stderr[-3000:]
        initial = json.loads((out / "diagnostics.json").read_text())[0]
        assert initial["epoch"] == 0
        hidden = [
            block["gradient_norm"]
            for block_name, block in initial["blocks"].items()
            if block_name != "output" and block["gradient_norm"] > 0
        ]
        assert len(hidden) >= DEPTH // 2, initial["blocks"].keys()  # resnet: 10 blocks of 2 layers
        ratios[name] = hidden[-1] / hidden[0]
    return ratios


def test_deep_sigmoid_mlp_gradient_vanishes(first_last_ratio: dict[str, float]) -> None:
    assert first_last_ratio["mlp"] >= 100


@pytest.mark.parametrize("family", ["highway", "resnet", "snn"])
def test_skip_connections_and_selu_keep_the_gradient(first_last_ratio: dict[str, float], family: str) -> None:
    assert 0.1 <= first_last_ratio[family] <= 10, first_last_ratio
