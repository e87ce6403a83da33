"""models/size.py: the spec-only size equals what Keras builds; limits refuse huge specs without building."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.settings import Settings
from models.data.summary import DataKeys, DatasetSummary
from models.size import model_size, size_problems
from models.spec import parse_spec

LIMITS = Settings(_env_file=None)

SPECS: list[tuple[dict[str, Any], list[int]]] = [
    ({"family": "mlp", "widths": [16, 8], "batch_norm": True, "dropout": 0.1}, [8, 8]),
    ({"family": "highway", "depth": 3, "width": 12, "activation": "leaky_relu", "dropout": 0.2}, [64]),
    ({"family": "highway", "depth": 2, "width": 64, "input_normalization": "standardize"}, [64]),
    ({"family": "resnet", "variant": "dense", "width": 10, "blocks": 2, "dropout": 0.1}, [20]),
    ({"family": "resnet", "variant": "dense", "width": 10, "blocks": 2, "batch_norm": False}, [10]),
    ({"family": "resnet", "variant": "conv", "stages": [1, 2], "filters": [4, 8]}, [8, 8]),
    (
        {"family": "resnet", "variant": "conv", "stages": [1, 1], "filters": [2, 4], "block": "bottleneck"},
        [9, 9, 3],
    ),
    ({"family": "snn", "widths": [16, 16], "batch_norm": True, "dropout": 0.1}, [30]),
    ({"family": "cnn", "filters": [4, 8], "dense_units": 16}, [12, 12]),
    ({"family": "cnn", "filters": [4], "padding": "same", "dropout": 0, "dense_dropout": 0}, [9, 9, 2]),
]


def _summary(input_shape: list[int], classes: int = 3) -> DatasetSummary:
    return DatasetSummary(
        sha256="",
        size_bytes=0,
        keys=DataKeys(),
        arrays={},
        rows={},
        input_shape=input_shape,
        target="integer_labels",
        num_classes=classes,
        output_dim=classes,
    )


@pytest.mark.parametrize(("arch", "input_shape"), SPECS, ids=lambda v: str(v)[:50])
def test_the_spec_only_size_equals_what_keras_builds(arch: dict[str, Any], input_shape: list[int]) -> None:
    from models.dryrun import dry_run

    spec_obj = {"architecture": arch, "training": {"batch_size": 7}}
    report = dry_run(spec_obj, _summary(input_shape))
    assert report["ok"], report["errors"]
    size = model_size(parse_spec(spec_obj), input_shape, 3)
    assert size is not None
    assert (size.parameters, size.trainable) == (
        report["parameters"]["total"],
        report["parameters"]["trainable"],
    )
    memory = report["memory_estimate_bytes"]
    assert memory["activations_per_batch"] == 2 * 7 * size.activations_per_sample * 4
    assert memory["input_batch"] == 7 * size.io_per_sample * 4


def _problems(arch: dict[str, Any], input_shape: list[int] | None = None, **training: Any) -> list[Any]:
    spec = parse_spec({"architecture": arch, "training": training})
    return size_problems(spec, input_shape or [64], 10, LIMITS)


@pytest.mark.parametrize(
    ("arch", "field", "words"),
    [
        ({"family": "highway", "depth": 2, "width": 20000}, "architecture.depth", "GPUYARD_MAX_MODEL_PARAMETERS"),
        ({"family": "highway", "depth": 100000, "width": 8}, "architecture.depth", "GPUYARD_MAX_MODEL_DEPTH"),
        ({"family": "highway", "depth": 10**9, "width": 8}, "architecture.depth", "1000000000"),
        ({"family": "highway", "depth": 2, "width": 10**9}, "architecture.width", "GPUYARD_MAX_LAYER_WIDTH"),
        ({"family": "mlp", "widths": [4] * 100000}, "architecture.widths", "100000 layers"),
        ({"family": "mlp", "widths": [2**62]}, "architecture.widths.0", str(2**62)),
        ({"family": "snn", "widths": [60000, 60000]}, "architecture.widths", "parameters"),
        ({"family": "resnet", "variant": "conv", "stages": [10**9], "filters": [4]}, "architecture.stages", "DEPTH"),
        ({"family": "cnn", "filters": [8], "dense_units": 10**6}, "architecture.dense_units", "WIDTH"),
    ],
)
def test_huge_specs_are_refused_naming_the_limit_and_the_value(arch: dict[str, Any], field: str, words: str) -> None:
    started = time.perf_counter()
    problems = _problems(arch, [28, 28] if arch["family"] in ("cnn", "resnet") else None)
    assert time.perf_counter() - started < 2  # bounds come before any walk over the depth
    assert problems, arch
    assert problems[0].code == "model_too_large"
    assert problems[0].field == field
    assert words in problems[0].detail and "Received:" in problems[0].detail


def test_training_memory_limit_names_the_batch_size() -> None:
    problems = _problems({"family": "mlp", "widths": [2048] * 4}, [4096], batch_size=65536)
    assert [p.field for p in problems] == ["training.batch_size"]
    assert "GPUYARD_MAX_TRAINING_MEMORY_BYTES" in problems[0].detail and "batch_size=65536" in problems[0].detail


def test_the_examples_and_ordinary_models_pass() -> None:
    assert _problems({"family": "highway", "depth": 10, "width": 256}) == []
    assert _problems({"family": "cnn"}, [28, 28]) == []
    assert (
        _problems({"family": "resnet", "variant": "conv", "stages": [2, 2, 2], "filters": [16, 32, 64]}, [32, 32, 3])
        == []
    )


def test_keras_json_layers_are_checked_where_units_are_known() -> None:
    def sequential(*units: int) -> dict[str, Any]:
        layers = [{"class_name": "InputLayer", "config": {"batch_shape": [None, 64], "name": "in"}}]
        layers += [{"class_name": "Dense", "config": {"units": u, "name": f"d{i}"}} for i, u in enumerate(units)]
        return {"family": "keras_json", "model_json": {"class_name": "Sequential", "config": {"layers": layers}}}

    assert _problems(sequential(32, 10)) == []
    wide = _problems(sequential(10**7, 10))
    assert [p.field for p in wide] == ["architecture.model_json"] and "'d0' units=10000000" in wide[0].detail
    heavy = _problems(sequential(60000, 60000, 10))
    assert "parameters" in heavy[0].detail
    deep = _problems(sequential(*([4] * 1001)))
    assert "GPUYARD_MAX_MODEL_DEPTH" in deep[0].detail
