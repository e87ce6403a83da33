"""The job spec: every refusal names the field and the value, all problems at once, a valid schema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.errors import SpecError
from models.spec import FAMILIES, job_spec_schema, parse_spec

ROOT = Path(__file__).resolve().parents[2]
MLP = {"architecture": {"family": "mlp", "widths": [16, 8]}}
GPU_UUID = "GPU-5f7c2a9e-1b3d-4c8e-9a6f-0e2d4b6a8c1f"


def spec_with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (default: a minimal mlp spec) with the dotted ``path`` set to ``value``."""
    spec = copy.deepcopy(base or MLP)
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return spec


def problems_of(obj: Any) -> list[Any]:
    with pytest.raises(SpecError) as info:
        parse_spec(obj)
    return info.value.problems


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = parse_spec(MLP)
    assert spec.training.seed == 0
    assert spec.training.shuffle is True
    assert spec.training.optimizer.name == "adam"
    assert spec.resources.memory_fraction == "auto" and spec.resources.fraction == 0.25  # sized at submit
    assert spec.resources.backend == "tensorflow"
    assert spec.resources.gpu == "any"
    assert spec.architecture.input_normalization == "none"
    assert spec.data.x_train == "X_train"
    assert spec.loss is None and spec.metrics is None


@pytest.mark.parametrize(
    ("path", "value", "field", "received"),
    [
        ("architecture.widths", [8, 0], "architecture.widths.1", "widths[1]=0"),
        ("architecture.widths", [], "architecture.widths", "widths=[]"),
        ("architecture.activation", "swish", "architecture.activation", "activation='swish'"),
        ("architecture.kernel_initializer", "xavier", "architecture.kernel_initializer", "'xavier'"),
        ("architecture.dropout", 1.0, "architecture.dropout", "dropout=1.0"),
        ("architecture.widhts", [8], "architecture.widhts", "widhts=[8]"),
        ("architecture.input_normalization", "zscore", "architecture.input_normalization", "'zscore'"),
        ("architecture.input_scale", 0.5, "architecture.input_scale", "input_scale=0.5"),
        ("architecture.family", "transformer", "architecture.family", "family='transformer'"),
        ("output.activation", "softmaxx", "output.activation", "'softmaxx'"),
        ("output.units", 0, "output.units", "units=0"),
        ("output.export", ["onnx", "tflite"], "output.export.1", "'tflite'"),
        ("loss", "msee", "loss", "loss='msee'"),
        ("metrics", ["accuracy", "f1"], "metrics", "'f1'"),
        ("training.epochs", 0, "training.epochs", "epochs=0"),
        ("training.batch_size", -1, "training.batch_size", "batch_size=-1"),
        ("training.validation_split", 1.0, "training.validation_split", "validation_split=1.0"),
        ("training.seed", -3, "training.seed", "seed=-3"),
        ("training.shuffle", "maybe", "training.shuffle", "shuffle='maybe'"),
        ("training.optimizer", {"name": "adagrad"}, "training.optimizer.name", "name='adagrad'"),
        ("training.optimizer", {"name": "adam", "momentum": 0.9}, "training.optimizer.momentum", "0.9"),
        ("training.optimizer", {"name": "sgd", "learning_rate": 0}, "training.optimizer.learning_rate", "=0"),
        ("training.early_stopping", {"patience": -1}, "training.early_stopping.patience", "patience=-1"),
        ("resources.memory_fraction", 0, "resources.memory_fraction", "memory_fraction=0"),
        ("resources.memory_fraction", 1.5, "resources.memory_fraction", "memory_fraction=1.5"),
        ("resources.backend", "mxnet", "resources.backend", "backend='mxnet'"),
        ("resources.max_runtime_s", 0, "resources.max_runtime_s", "max_runtime_s=0"),
        ("resources.gpu", "GPU-1234", "resources.gpu", "gpu='GPU-1234'"),
        ("resources.gpu", "0", "resources.gpu", "gpu='0'"),
        ("data.num_classes", 1, "data.num_classes", "num_classes=1"),
        ("data.x_tran", "X", "data.x_tran", "x_tran='X'"),
        ("nmae", "typo", "nmae", "nmae='typo'"),
    ],
)
def test_refusal_names_field_and_value(path: str, value: Any, field: str, received: str) -> None:
    problems = problems_of(spec_with(path, value))
    assert [p.field for p in problems] == [field], problems
    detail = problems[0].detail
    assert detail.startswith(f"{field}:"), detail
    assert "Received:" in detail and received in detail, detail


@pytest.mark.parametrize(
    ("architecture", "field"),
    [
        ({"family": "resnet", "width": 8, "blocks": 1}, "architecture.variant"),
        ({"family": "resnet", "variant": "conv", "stages": [1, 1], "filters": [8]}, "architecture.filters"),
        ({"family": "highway", "width": 8}, "architecture.depth"),
        ({"family": "snn", "widths": [8], "input_normalization": "none"}, "architecture.input_normalization"),
        ({"family": "mlp", "widths": [8], "input_normalization": "rescale"}, "architecture.input_scale"),
        ({"family": "keras_json", "model_json": "{not json"}, "architecture.model_json"),
        ({"family": "keras_json", "model_json": {"layers": []}}, "architecture.model_json"),
        ({"family": "cnn", "filters": [8], "padding": "full"}, "architecture.padding"),
    ],
)
def test_family_refusals_name_the_field(architecture: dict[str, Any], field: str) -> None:
    problems = problems_of({"architecture": architecture})
    assert field in [p.field for p in problems], problems
    assert all(p.detail.startswith(f"{p.field}:") and "Received:" in p.detail for p in problems)


def test_every_problem_is_reported_at_once() -> None:
    obj = {
        "architecture": {"family": "highway", "depth": 0, "width": -4, "transform_bais": -2},
        "loss": "nope",
        "training": {"epochs": 0, "optimizer": {"name": "rmsprop", "nesterov": True}},
        "resources": {"memory_fraction": 2, "gpu": "gpu0"},
    }
    problems = problems_of(obj)
    assert {p.field for p in problems} == {
        "architecture.depth",
        "architecture.width",
        "architecture.transform_bais",
        "loss",
        "training.epochs",
        "training.optimizer.nesterov",
        "resources.memory_fraction",
        "resources.gpu",
    }
    assert all(p.code for p in problems)


def test_spec_error_chains_the_pydantic_error_and_serializes() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with("training.epochs", "ten"))
    assert isinstance(info.value.__cause__, ValidationError)
    body = info.value.to_dict()
    assert body["error"] == "spec_invalid"
    assert body["problems"][0]["field"] == "training.epochs"
    json.dumps(body)


@pytest.mark.parametrize("obj", [None, [], "mlp", 3])
def test_non_object_spec_is_refused(obj: Any) -> None:
    problems = problems_of(obj)
    assert "Received:" in problems[0].detail


@pytest.mark.parametrize(
    ("alias", "full"),
    [
        ("mse", "mean_squared_error"),
        ("mae", "mean_absolute_error"),
        ("msle", "mean_squared_logarithmic_error"),
        ("mape", "mean_absolute_percentage_error"),
        ("kld", "kl_divergence"),
        ("logcosh", "log_cosh"),
        ("categorical_crossentropy", "categorical_crossentropy"),
    ],
)
def test_loss_aliases_are_stored_in_full(alias: str, full: str) -> None:
    assert parse_spec(spec_with("loss", alias)).loss == full


def test_metric_aliases_are_stored_in_full() -> None:
    spec = parse_spec(spec_with("metrics", ["acc", "mae", "mse"]))
    assert spec.metrics == ["accuracy", "mean_absolute_error", "mean_squared_error"]
    assert problems_of(spec_with("metrics", ["mae", "mean_absolute_error"]))[0].code == "metric_repeated"


@pytest.mark.parametrize("gpu", ["any", "cpu", GPU_UUID, "MIG-" + GPU_UUID[4:], "MIG-" + GPU_UUID + "/1/0"])
def test_gpu_accepts_any_cpu_and_uuids(gpu: str) -> None:
    assert parse_spec(spec_with("resources.gpu", gpu)).resources.gpu == gpu


def test_optimizers_and_families_parse() -> None:
    spec = parse_spec(spec_with("training.optimizer", {"name": "sgd", "momentum": 0.9, "nesterov": True}))
    assert spec.training.optimizer.momentum == 0.9
    resnet = parse_spec({"architecture": {"family": "resnet", "variant": "conv", "stages": [1], "filters": [4]}})
    assert resnet.architecture.block == "basic"
    snn = parse_spec({"architecture": {"family": "snn", "widths": [8]}})
    arch = snn.architecture
    assert (arch.activation, arch.kernel_initializer, arch.alpha_dropout) == ("selu", "lecun_normal", 0.05)
    assert arch.input_normalization == "standardize"
    cnn = parse_spec({"architecture": {"family": "cnn"}}).architecture
    assert (cnn.filters, cnn.kernel_size, cnn.pool_size, cnn.dense_units) == ([32, 64], 3, 2, 128)
    assert (cnn.dropout, cnn.dense_dropout) == (0.25, 0.5)
    highway = parse_spec({"architecture": {"family": "highway", "depth": 2, "width": 8}}).architecture
    assert highway.transform_bias == -2.0


def test_schema_is_valid_json_schema_with_every_family() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = job_spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    families = {
        definition["properties"]["family"]["const"]
        for definition in schema["$defs"].values()
        if "family" in definition.get("properties", {})
    }
    assert families == set(FAMILIES)
    json.dumps(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(MLP))
    assert list(validator.iter_errors(spec_with("architecture.widhts", [3])))
    for path in sorted((ROOT / "examples" / "specs").glob("*.json")):
        assert not list(validator.iter_errors(json.loads(path.read_text()))), path.name


def test_spec_module_does_not_import_a_framework() -> None:
    code = (
        "import sys; import models.spec, models.heads; "
        "bad = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules]; "
        "assert not bad, bad; models.spec.job_spec_schema()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_output_export_names_each_format_once() -> None:
    spec = parse_spec({**copy.deepcopy(MLP), "output": {"export": ["saved_model", "onnx", "saved_model"]}})
    assert spec.output.export == ["saved_model", "onnx"]
    assert parse_spec(copy.deepcopy(MLP)).output.export == []


_HIGHWAY = {"family": "highway", "depth": 2, "width": 8}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"architecture": {**_HIGHWAY, "transform_bias": float("nan")}}, "architecture.transform_bias"),
        ({"architecture": {**_HIGHWAY, "transform_bias": float("-inf")}}, "architecture.transform_bias"),
        (
            {"architecture": _HIGHWAY, "training": {"optimizer": {"name": "adam", "learning_rate": float("inf")}}},
            "training.optimizer.learning_rate",
        ),
        (
            {"architecture": _HIGHWAY, "training": {"early_stopping": {"min_delta": float("nan")}}},
            "training.early_stopping.min_delta",
        ),
        ({"architecture": {**_HIGHWAY, "leaky_relu_slope": float("nan")}}, "architecture.leaky_relu_slope"),
        ({"architecture": _HIGHWAY, "resources": {"memory_fraction": float("nan")}}, "resources.memory_fraction"),
    ],
    ids=["bias-nan", "bias-inf", "lr-inf", "min-delta-nan", "slope-nan", "fraction-nan"],
)
def test_nan_and_infinity_are_refused_for_every_float(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert [p.field for p in caught.value.problems] == [field]
    assert "finite number" in caught.value.problems[0].detail


def test_nan_in_the_json_text_is_refused_too() -> None:
    text = '{"architecture": {"family": "highway", "depth": 2, "width": 8, "transform_bias": NaN}}'
    with pytest.raises(SpecError):
        parse_spec(json.loads(text))  # Python's json reads NaN; the API's body parser is json.loads


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"architecture": {**_HIGHWAY, "depth": "12"}}, "architecture.depth"),
        ({"architecture": {**_HIGHWAY, "transform_bias": "-2"}}, "architecture.transform_bias"),
        ({"architecture": _HIGHWAY, "training": {"epochs": "12"}}, "training.epochs"),
        ({"architecture": _HIGHWAY, "training": {"batch_size": 12.0}}, "training.batch_size"),
        ({"architecture": _HIGHWAY, "training": {"shuffle": "yes"}}, "training.shuffle"),
        ({"architecture": _HIGHWAY, "training": {"epochs": True}}, "training.epochs"),
        ({"architecture": _HIGHWAY, "resources": {"memory_fraction": "0.5"}}, "resources.memory_fraction"),
        ({"architecture": {"family": "mlp", "widths": ["16"]}}, "architecture.widths.0"),
        ({"architecture": _HIGHWAY, "data": {"num_classes": "10"}}, "data.num_classes"),
    ],
    ids=["depth", "bias", "epochs", "batch-float", "shuffle", "epochs-bool", "fraction", "widths", "num-classes"],
)
def test_strings_and_bools_are_not_coerced_into_numbers(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert [p.field for p in caught.value.problems] == [field]


def test_ints_are_still_accepted_for_floats() -> None:
    spec = parse_spec(
        {
            "architecture": {**_HIGHWAY, "transform_bias": -2},
            "training": {"optimizer": {"name": "sgd", "learning_rate": 1, "momentum": 0}},
            "resources": {"memory_fraction": 1},
        }
    )
    assert spec.architecture.transform_bias == -2.0  # type: ignore[union-attr]
    assert spec.resources.fraction == 1.0
