"""build_model: every family builds from built-in layers, names its blocks, and round-trips via .h5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from core.errors import SpecError
from models.blocks.keras_json import config_problems
from models.build import build_model, compute_input_stats, layer_blocks, needs_input_stats
from models.data.summary import DataKeys, DatasetSummary
from models.spec import parse_spec


def summary_for(input_shape: list[int], target: str = "integer_labels", output_dim: int = 10) -> DatasetSummary:
    """A data summary like the data checks produce, for ``input_shape`` samples."""
    classes = None if target == "regression" else output_dim
    return DatasetSummary(
        sha256="0" * 64,
        size_bytes=1,
        keys=DataKeys(),
        arrays={},
        rows={"train": 64},
        input_shape=input_shape,
        target=target,
        num_classes=classes,
        classes=list(range(classes)) if classes else None,
        output_dim=output_dim,
    )


def build(architecture: dict[str, Any], input_shape: list[int], x: np.ndarray | None = None, **spec: Any):
    parsed = parse_spec({"architecture": architecture, **spec})
    stats = compute_input_stats(x) if x is not None and needs_input_stats(parsed) else None
    return build_model(parsed, summary_for(input_shape), input_stats=stats)


def keras_json_of(*layers: keras.layers.Layer, input_shape: tuple[int, ...] = (64,)) -> str:
    return keras.Sequential([keras.Input(input_shape, name="pixels"), *layers], name="user_model").to_json()


RNG = np.random.default_rng(0)
X_VEC = RNG.uniform(0, 16, (64, 64)).astype("float32")
X_IMG = X_VEC.reshape(-1, 8, 8, 1)
Y_INT = RNG.integers(0, 10, 64)

# name → (architecture, per-sample shape, extra spec keys); each a different code path, kept tiny.
FAMILIES: dict[str, tuple[dict[str, Any], list[int], dict[str, Any]]] = {
    "mlp": (
        {"family": "mlp", "widths": [16, 8], "batch_norm": True, "dropout": 0.1, "activation": "leaky_relu"},
        [64],
        {},
    ),
    "highway": (
        {"family": "highway", "depth": 2, "width": 16, "input_normalization": "standardize"},
        [64],
        {},
    ),
    "resnet_dense": ({"family": "resnet", "variant": "dense", "width": 16, "blocks": 2}, [64], {}),
    "resnet_basic": (
        {
            "family": "resnet",
            "variant": "conv",
            "stages": [1, 1],
            "filters": [4, 8],
            "input_normalization": "rescale",
            "input_scale": 0.0625,
        },
        [8, 8, 1],
        {"training": {"optimizer": {"name": "sgd", "momentum": 0.9}}},
    ),
    "resnet_bottleneck": (
        {"family": "resnet", "variant": "conv", "stages": [1, 1], "filters": [2, 4], "block": "bottleneck"},
        [8, 8],
        {"training": {"optimizer": {"name": "rmsprop"}}},
    ),
    "snn": ({"family": "snn", "widths": [16, 16]}, [64], {}),
    "cnn": ({"family": "cnn", "filters": [4, 8], "dense_units": 16}, [8, 8, 1], {}),
    "keras_json": (
        {
            "family": "keras_json",
            "model_json": keras_json_of(
                keras.layers.Dense(8, activation="relu", name="hidden"),
                keras.layers.BatchNormalization(name="norm"),
                keras.layers.Dense(10, activation="softmax", name="probs"),
            ),
        },
        [64],
        {},
    ),
}


def family_input(shape: list[int]) -> np.ndarray:
    return X_VEC.reshape(-1, *shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_builds_compiled_from_builtin_layers(family: str) -> None:
    architecture, shape, extra = FAMILIES[family]
    x = family_input(shape)
    model = build(architecture, shape, x, **extra)
    assert model.compiled
    assert model.loss == "sparse_categorical_crossentropy"
    assert model.output_shape == (None, 10)
    for layer in model.layers:
        assert type(layer).__module__.startswith("keras.src."), layer
        assert type(layer).__name__ not in ("Lambda", "TFSMLayer"), layer
    blocks = layer_blocks(model)
    assert sum(len(v) for v in blocks.values()) == len(model.layers)
    if family != "keras_json":
        assert list(blocks)[:: len(blocks) - 1] == ["input", "output"]


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    architecture = {"family": "mlp", "widths": [8]}
    first = build(architecture, [64], training={"seed": 7}).get_weights()
    again = build(architecture, [64], training={"seed": 7}).get_weights()
    other = build(architecture, [64], training={"seed": 8}).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_highway_gate_bias_starts_at_transform_bias_and_projects_input() -> None:
    model = build({"family": "highway", "depth": 3, "width": 16, "transform_bias": -1.5}, [64])
    for index in (1, 2, 3):
        gate = model.get_layer(f"highway{index}_t")
        assert gate.get_config()["activation"] == "sigmoid"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(gate.bias), np.full(16, -1.5, np.float32))
        classes = {type(model.get_layer(f"highway{index}_{part}")).__name__ for part in ("h_minus_x", "gated", "add")}
        assert classes == {"Subtract", "Multiply", "Add"}
    assert model.get_layer("proj_dense").units == 16
    assert list(layer_blocks(model)) == ["input", "proj", "highway1", "highway2", "highway3", "output"]


def test_highway_without_projection_and_with_flatten() -> None:
    model = build({"family": "highway", "depth": 1, "width": 64}, [8, 8])
    names = [layer.name for layer in model.layers]
    assert "input_flatten" in names and "proj_dense" not in names


def test_highway_fresh_block_carries_its_input() -> None:
    # With a very negative gate bias, T ≈ 0, so a block outputs ≈ its input.
    model = build({"family": "highway", "depth": 1, "width": 64, "transform_bias": -30.0}, [64])
    block = keras.Model(model.inputs, model.get_layer("highway1_add").output)
    x = X_VEC[:4] / 16.0
    np.testing.assert_allclose(block.predict(x, verbose=0), x, atol=1e-5)


def expected_projections(stages: list[int], filters: list[int], block: str, stem: int) -> set[str]:
    channels, names = stem, set()
    for stage, (blocks, width) in enumerate(zip(stages, filters, strict=True), start=1):
        out = 4 * width if block == "bottleneck" else width
        for index in range(1, blocks + 1):
            stride = 2 if stage > 1 and index == 1 else 1
            if stride != 1 or channels != out:
                names.add(f"stage{stage}_block{index}_0_conv")
            channels = out
    return names


@pytest.mark.parametrize(
    ("stages", "filters", "block", "stem_filters", "expected"),
    [
        ([2, 1, 1], [4, 4, 8], "basic", None, {"stage2_block1_0_conv", "stage3_block1_0_conv"}),
        ([2, 1], [4, 8], "bottleneck", None, {"stage1_block1_0_conv", "stage2_block1_0_conv"}),
        ([1, 2], [4, 4], "bottleneck", 16, {"stage2_block1_0_conv"}),
        ([1], [4], "basic", 8, {"stage1_block1_0_conv"}),
    ],
)
def test_resnet_conv_names_and_projection_shortcuts(
    stages: list[int], filters: list[int], block: str, stem_filters: int | None, expected: set[str]
) -> None:
    architecture = {
        "family": "resnet",
        "variant": "conv",
        "stages": stages,
        "filters": filters,
        "block": block,
    }
    if stem_filters:
        architecture["stem_filters"] = stem_filters
    model = build(architecture, [8, 8, 1])
    names = {layer.name for layer in model.layers}
    projections = {n for n in names if n.endswith("_0_conv")}
    assert projections == expected == expected_projections(stages, filters, block, stem_filters or filters[0])
    for projection in projections:
        assert projection.replace("_0_conv", "_0_bn") in names
    convs = 3 if block == "bottleneck" else 2
    for stage, blocks in enumerate(stages, start=1):
        for index in range(1, blocks + 1):
            prefix = f"stage{stage}_block{index}"
            assert {f"{prefix}_{i}_conv" for i in range(1, convs + 1)} <= names
            assert {f"{prefix}_add", f"{prefix}_out"} <= names
            first = model.get_layer(f"{prefix}_1_conv")
            assert first.strides == ((2, 2) if stage > 1 and index == 1 else (1, 1))
    if len(stages) > 1:
        assert model.get_layer("stage2_block1_out").output.shape[1:3] == (4, 4)
    assert model.get_layer("stage1_block1_out").output.shape[1:3] == (8, 8)
    assert "stage1_block1" in layer_blocks(model)


def test_conv_families_reshape_2d_samples() -> None:
    model = build({"family": "cnn", "filters": [4], "dense_units": 8}, [8, 8])
    assert model.get_layer("input_reshape").output.shape == (None, 8, 8, 1)


def test_semantic_problems_are_reported_together() -> None:
    spec = parse_spec(
        {
            "architecture": {"family": "cnn", "input_shape": [8, 8, 1]},
            "output": {"units": 3},
            "loss": "categorical_crossentropy",
            "metrics": ["categorical_accuracy"],
        }
    )
    with pytest.raises(SpecError) as info:
        build_model(spec, summary_for([64]))
    fields = [p.field for p in info.value.problems]
    assert fields == ["architecture.input_shape", "architecture.family", "output.units", "loss", "metrics.0"]
    detail = str(info.value)
    assert "[64]" in detail and "units=3" in detail and "categorical_crossentropy" in detail


def test_cnn_refuses_images_too_small_for_its_convolutions() -> None:
    spec = parse_spec({"architecture": {"family": "cnn", "filters": [4, 4, 4], "kernel_size": 3}})
    with pytest.raises(SpecError) as info:
        build_model(spec, summary_for([5, 5, 1]))
    assert info.value.problems[0].field == "architecture.kernel_size"
    assert "5×5" in info.value.problems[0].detail


def test_regression_head_and_one_hot_head_follow_the_data() -> None:
    spec = parse_spec({"architecture": {"family": "mlp", "widths": [8]}})
    regression = build_model(spec, summary_for([64], "regression", 3))
    assert regression.get_layer("output").get_config()["activation"] == "linear"
    assert regression.loss == "mean_squared_error"
    one_hot = build_model(spec, summary_for([64], "one_hot", 4))
    assert one_hot.loss == "categorical_crossentropy" and one_hot.output_shape == (None, 4)


def test_standardize_without_stats_is_a_programming_error() -> None:
    spec = parse_spec({"architecture": {"family": "snn", "widths": [8]}})
    with pytest.raises(ValueError, match="compute_input_stats"):
        build_model(spec, summary_for([64]))


def test_input_stats_give_constant_features_unit_variance() -> None:
    x = np.stack([np.zeros(10), np.arange(10.0)], axis=1)
    mean, variance = compute_input_stats(x)
    np.testing.assert_allclose(mean, [0.0, 4.5])
    np.testing.assert_allclose(variance, [1.0, np.var(np.arange(10.0))])


def test_snn_normalization_stats_live_in_the_model() -> None:
    model = build({"family": "snn", "widths": [16, 16]}, [64], X_VEC)
    mean, variance = compute_input_stats(X_VEC)
    standardized = (X_VEC - mean) / np.sqrt(variance)
    y = standardized
    for layer in model.layers[2:]:  # everything after Input and Normalization
        y = layer(y, training=False)
    np.testing.assert_allclose(model.predict(X_VEC, verbose=0), keras.ops.convert_to_numpy(y), atol=1e-5)
    assert type(model.layers[1]).__name__ == "Normalization"
    names = [layer.name for layer in model.layers]
    assert "snn1_selu" in names and "snn1_alpha_dropout" in names


# ---------------------------------------------------------------------------------------------------
# keras_json: refusals name the layer
# ---------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="someone")
class SneakyDense(keras.layers.Dense):
    pass


@keras.saving.register_keras_serializable(package="someone")
class SneakyInit(keras.initializers.Initializer):
    def __call__(self, shape, dtype=None):
        return keras.ops.zeros(shape, dtype=dtype)


def keras_json_problems(model_json: str | dict[str, Any]) -> list[str]:
    spec = parse_spec({"architecture": {"family": "keras_json", "model_json": model_json}})
    with pytest.raises(SpecError) as info:
        build_model(spec, summary_for([64]))
    assert all(p.field == "architecture.model_json" for p in info.value.problems)
    return [p.detail for p in info.value.problems]


def test_keras_json_refuses_lambda_naming_the_layer() -> None:
    model_json = keras_json_of(keras.layers.Lambda(lambda t: t * 2, name="doubler"), keras.layers.Dense(10))
    details = keras_json_problems(model_json)
    assert len(details) == 1
    assert "'doubler'" in details[0] and "Lambda" in details[0]


def test_keras_json_refuses_custom_class_naming_the_layer() -> None:
    details = keras_json_problems(keras_json_of(SneakyDense(10, name="sneaky")))
    assert len(details) == 1 and "'sneaky'" in details[0] and "SneakyDense" in details[0]
    details = keras_json_problems(keras_json_of(keras.layers.Dense(10, kernel_initializer=SneakyInit(), name="d")))
    assert len(details) == 1 and "'d'" in details[0] and "SneakyInit" in details[0]


def test_keras_json_refuses_unknown_class_and_foreign_module() -> None:
    config = json.loads(keras_json_of(keras.layers.Dense(10, name="head")))
    config["config"]["layers"][1]["class_name"] = "FancyDense"
    details = keras_json_problems(config)
    assert len(details) == 1 and "'head'" in details[0] and "FancyDense" in details[0]
    config["config"]["layers"][1].update(class_name="system", module="os")
    assert "'head'" in keras_json_problems(config)[0]


def test_keras_json_reports_every_refused_layer() -> None:
    model_json = keras_json_of(
        keras.layers.Lambda(lambda t: t, name="first"), SneakyDense(10, name="second"), keras.layers.Dense(10)
    )
    details = keras_json_problems(model_json)
    assert len(details) == 2 and "'first'" in details[0] and "'second'" in details[1]


def test_keras_json_accepts_builtins_and_checks_shapes() -> None:
    assert not config_problems(json.loads(FAMILIES["keras_json"][0]["model_json"]))
    wrong_input = keras_json_of(keras.layers.Dense(10), input_shape=(32,))
    assert any("[32]" in d for d in keras_json_problems(wrong_input))
    wrong_output = keras_json_of(keras.layers.Dense(3))
    assert any("[3]" in d for d in keras_json_problems(wrong_output))


# ---------------------------------------------------------------------------------------------------
# .h5 round trip in a fresh interpreter that imports only keras and numpy
# ---------------------------------------------------------------------------------------------------

RELOAD_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, keras
out = {}
for name in sys.argv[1:]:
    model = keras.models.load_model(name + ".h5")  # compile=True, safe_mode=True: the defaults
    x = np.load(name + "_x.npy")
    diff = float(np.abs(model.predict(x, verbose=0) - np.load(name + "_y.npy")).max())
    out[name] = {"diff": diff, "loss": str(model.loss), "optimizer": type(model.optimizer).__name__,
                 "compiled": bool(model.compiled)}
assert not any(m == "models" or m.startswith(("models.", "worker", "service")) for m in sys.modules)
print(json.dumps(out))
"""


# Training traces a train step per model (seconds each on a shared 2-core box): train only models whose
# saved state then differs from a fresh one in more ways (BatchNormalization statistics, optimizer slots).
TRAINED_BEFORE_SAVING = {"mlp", "keras_json", "resnet_basic"}


@pytest.mark.slow
def test_every_family_reloads_from_h5_in_a_fresh_interpreter(tmp_path: Path) -> None:
    cases = dict(FAMILIES)
    # A regression head with the loss alias "mse" (stored as mean_squared_error): the FACTS.md trap.
    cases["mlp_mse"] = (
        {"family": "mlp", "widths": [8], "input_normalization": "rescale", "input_scale": 0.5},
        [64],
        {"loss": "mse", "metrics": ["mae"]},
    )
    expected = {}
    for name, (architecture, shape, extra) in cases.items():
        x = family_input(shape)
        parsed = parse_spec({"architecture": architecture, **extra})
        stats = compute_input_stats(x) if needs_input_stats(parsed) else None
        if name == "mlp_mse":
            model = build_model(parsed, summary_for([64], "regression", 2), input_stats=stats)
            y = RNG.normal(size=(len(x), 2)).astype("float32")
        else:
            model = build_model(parsed, summary_for(shape), input_stats=stats)
            y = Y_INT
        if name in TRAINED_BEFORE_SAVING:
            model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        model.save(tmp_path / f"{name}.h5")
        np.save(tmp_path / f"{name}_x.npy", x)
        np.save(tmp_path / f"{name}_y.npy", model.predict(x, verbose=0))
        expected[name] = type(model.optimizer).__name__
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, *cases],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["diff"] <= 1e-6, (name, result)
        assert result["compiled"] and result["optimizer"] == expected[name], (name, result)
    assert "mean_squared_error" in results["mlp_mse"]["loss"]
    assert "sparse_categorical_crossentropy" in results["cnn"]["loss"]


@pytest.mark.parametrize(
    "arch",
    [
        {"family": "highway", "depth": 100, "width": 4},
        {"family": "resnet", "variant": "dense", "blocks": 100, "width": 4},
    ],
    ids=["highway", "resnet"],
)
def test_a_graph_deeper_than_the_recursion_limit_builds_saves_and_loads(arch: dict[str, Any], tmp_path: Path) -> None:
    """Depth at GPUYARD_MAX_MODEL_DEPTH (1000 blocks, ~5000-10000 nodes) once ended in RecursionError:
    Keras walks the graph one frame per node. Scaled down here: a limit of 120 frames, 100 blocks.
    """
    from worker.trainer.modelops import load_model  # the ops' loader, under the same allowance

    summary = DatasetSummary(
        sha256="0" * 64, size_bytes=1, keys=DataKeys(), arrays={}, rows={"train": 8}, input_shape=[4],
        target="integer_labels", num_classes=3, classes=[0, 1, 2], output_dim=3,
    )  # fmt: skip
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(120)
    try:
        model = build_model(parse_spec({"architecture": arch}), summary)
        model.save(tmp_path / "model.h5")
        sys.setrecursionlimit(120)
        assert load_model(tmp_path / "model.h5").count_params() == model.count_params()
    finally:
        sys.setrecursionlimit(saved)
