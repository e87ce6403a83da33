"""Health findings at epoch 0, in-process: the model built from a spec and one diagnostics record on digits.

The course's claims as tests: a 20-layer sigmoid MLP's gradient vanishes; the example specs and the course's
Highway, residual and SNN networks at depth 20 raise nothing; a 32-block SNN keeps every block near mean 0,
variance 1 on standardized input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.build import build_model, compute_input_stats, layer_blocks, needs_input_stats  # noqa: E402
from models.data.summary import DataKeys, DatasetSummary  # noqa: E402
from models.health import HealthThresholds, health_events  # noqa: E402
from models.spec import parse_spec  # noqa: E402
from worker.trainer.diagnostics import Diagnostics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "specs"
IMAGE_EXAMPLES = {"resnet_conv", "cnn"}
PROBE_ROWS = 64  # the trainer's default probe batch (GPUYARD_PROBE_BATCH_SIZE)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """1437 shuffled training rows of digits, features in [0, 1] as models.data.digits writes them."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype("float32")[:1437], y[order].astype("int64")[:1437]


def epoch0(spec_obj: dict[str, Any], x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The trainer's epoch-0 diagnostics record of ``spec_obj`` on ``(x, y)``, and its health findings."""
    spec = parse_spec(spec_obj)
    summary = DatasetSummary(
        sha256="0" * 64,
        size_bytes=1,
        keys=DataKeys(),
        arrays={},
        rows={"train": len(x)},
        input_shape=list(x.shape[1:]),
        target="integer_labels",
        num_classes=10,
        classes=list(range(10)),
        output_dim=10,
    )
    stats = compute_input_stats(x) if needs_input_stats(spec) else None
    model = build_model(spec, summary, input_stats=stats)
    record = Diagnostics(model, layer_blocks(model), x[:PROBE_ROWS], y[:PROBE_ROWS]).record(0)
    findings = health_events(record, family=spec.architecture.family, thresholds=HealthThresholds(), epoch=0)
    return record, findings


def deep(architecture: dict[str, Any]) -> dict[str, Any]:
    return {"architecture": {"input_normalization": "standardize", **architecture}, "training": {"seed": 0}}


def test_deep_sigmoid_mlp_raises_vanishing_gradient_with_a_remedy(digits: tuple[np.ndarray, np.ndarray]) -> None:
    spec = deep({"family": "mlp", "widths": [32] * 20, "activation": "sigmoid", "kernel_initializer": "glorot_uniform"})
    record, findings = epoch0(spec, *digits)
    assert [f["kind"] for f in findings] == ["vanishing_gradient"], findings
    finding = findings[0]
    assert finding["value"] < 1e-6 and finding["threshold"] == 1e-3
    assert finding["blocks"][0] == "dense1" and "dense20" not in finding["blocks"]
    assert "ReLU" in finding["remedy"] and "residual" in finding["remedy"]
    first, last = record["blocks"]["dense1"]["gradient_norm"], record["blocks"]["dense20"]["gradient_norm"]
    assert finding["value"] == pytest.approx(first / last)
    json.dumps(findings, allow_nan=False)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_example_specs_raise_no_health_event(name: str, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    if name in IMAGE_EXAMPLES:
        x = x.reshape(-1, 8, 8, 1)
    record, findings = epoch0(json.loads((EXAMPLES / f"{name}.json").read_text()), x, y)
    assert findings == [], json.dumps(record, indent=1)


def course_architecture(family: str, depth: int) -> dict[str, Any]:
    """The architecture examples/course/run.py gives ``family`` at ``depth``."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("course_run", ROOT / "examples" / "course" / "run.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.architecture(family, depth)


COURSE_AT_20 = ("d_highway", "e_residual", "f_snn")


@pytest.mark.parametrize("family", COURSE_AT_20)
def test_course_skip_and_selu_networks_at_depth_20_raise_nothing(
    family: str, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    record, findings = epoch0(deep(course_architecture(family, 20)), *digits)
    assert findings == [], json.dumps(record, indent=1)
    hidden = [b["gradient_norm"] for n, b in record["blocks"].items() if b["parameters"] and n != "output"]
    assert 0.1 <= hidden[0] / hidden[-1] <= 10


def test_snn_of_32_blocks_stays_self_normalized(digits: tuple[np.ndarray, np.ndarray]) -> None:
    record, findings = epoch0(deep({"family": "snn", "widths": [64] * 32, "alpha_dropout": 0.05}), *digits)
    blocks = {n: b for n, b in record["blocks"].items() if n.startswith("snn")}
    assert len(blocks) == 32
    for name, block in blocks.items():
        assert abs(block["activation_mean"]) <= 0.1, (name, block)
        assert abs(block["activation_std"] ** 2 - 1) <= 0.2, (name, block)
    assert findings == []


def test_dead_relu_units_are_counted_per_block(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Biases of -50 keep every unit of the second block below zero: all dead, and reported."""
    spec = deep({"family": "mlp", "widths": [32, 32], "activation": "relu", "kernel_initializer": "he_normal"})
    x, y = digits
    model = build_model(
        parse_spec(spec),
        DatasetSummary(
            sha256="0" * 64, size_bytes=1, keys=DataKeys(), arrays={}, rows={"train": len(x)}, input_shape=[64],
            target="integer_labels", num_classes=10, classes=list(range(10)), output_dim=10,
        ),
        input_stats=compute_input_stats(x),
    )  # fmt: skip
    dense2 = model.get_layer("dense2_dense")
    dense2.set_weights([dense2.get_weights()[0], np.full(32, -50.0, "float32")])
    record = Diagnostics(model, layer_blocks(model), x[:PROBE_ROWS], y[:PROBE_ROWS]).record(0)
    assert record["blocks"]["dense2"]["relu_units"] == 32
    assert record["blocks"]["dense2"]["dead_share"] == 1.0
    assert record["blocks"]["dense1"]["dead_share"] < 0.5
    findings = health_events(record, family="mlp", epoch=0)
    assert "dead_units" in [f["kind"] for f in findings]
    dead = next(f for f in findings if f["kind"] == "dead_units")
    assert dead["blocks"] == ["dense2"] and dead["value"] == 1.0 and "LeakyReLU" in dead["remedy"]


def test_dry_run_predicts_the_vanishing_gradient_of_a_deep_sigmoid_mlp() -> None:
    from models.dryrun import dry_run

    spec = {
        "architecture": {"family": "mlp", "input_shape": [64], "widths": [32] * 20, "activation": "sigmoid"},
        "output": {"units": 10},
    }
    report = dry_run(spec, None)
    assert report["ok"], report["errors"]
    assert [f["kind"] for f in report["health"]] == ["vanishing_gradient"]
    warning = next(w for w in report["warnings"] if w["code"] == "vanishing_gradient")
    assert "Remedy:" in warning["detail"] and warning["field"] == "architecture.activation"


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_dry_run_of_the_examples_predicts_nothing(name: str) -> None:
    from models.dryrun import dry_run

    report = dry_run(json.loads((EXAMPLES / f"{name}.json").read_text()), None)
    assert report["health"] == []
    assert not [w for w in report["warnings"] if w["code"] in ("vanishing_gradient", "exploding_gradient")]


def test_huge_learning_rate_stops_the_job_early_with_stop_on(tmp_path: Path, small_digits_h5: Path) -> None:
    """Learning rate 1e6: the first epoch overflows; with training.stop_on the job fails there, not 20 epochs on."""
    from trainer_helpers import run_trainer, write_spec

    spec = {
        "name": "lr 1e6",
        "architecture": {
            "family": "mlp",
            "widths": [32, 32],
            "activation": "relu",
            "input_normalization": "standardize",
        },
        "training": {
            "epochs": 20,
            "batch_size": 50,
            "optimizer": {"name": "sgd", "learning_rate": 1e6},
            "stop_on": ["loss_not_finite", "exploding_gradient"],
        },
    }
    run = run_trainer(write_spec(tmp_path / "spec.json", spec), small_digits_h5, tmp_path / "out")
    assert run.returncode == 8, run.stderr[-3000:]  # ExitCode.UNHEALTHY
    health = run.of("health")
    assert health and health[0]["epoch"] <= 1
    assert {f["kind"] for f in health[0]["findings"]} & {"loss_not_finite", "exploding_gradient"}
    assert len(run.of("epoch_end")) <= 1
    (failed,) = run.of("failed")
    assert failed["reason"] == "unhealthy" and "training.stop_on" in failed["detail"]
    assert "Remedy:" in failed["detail"]


def _sigmoid_like_record(epoch: int) -> dict[str, Any]:
    blocks = {f"dense{i}": {"gradient_norm": 0.25 ** (20 - i), "parameters": 10} for i in range(1, 21)}
    return {"epoch": epoch, "probe_loss": 2.3, "gradient_norms": {}, "blocks": {**blocks, "output": {
        "gradient_norm": 1.0, "parameters": 10}}}  # fmt: skip


def test_health_monitor_emits_news_restates_on_resume_and_stops_on_request() -> None:
    import io

    from core.exitcodes import ExitCode
    from worker.trainer.callbacks import HealthMonitor
    from worker.trainer.env import TrainingStopped
    from worker.trainer.events import EventEmitter

    def monitor(stop_on: list[str]) -> tuple[HealthMonitor, io.StringIO]:
        stream = io.StringIO()
        emitter = EventEmitter(stream)
        return HealthMonitor(emitter, [], family="mlp", thresholds=HealthThresholds(), stop_on=stop_on), stream

    def events(stream: io.StringIO) -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    watching, stream = monitor([])
    watching.check(_sigmoid_like_record(0), 0)
    watching.check(_sigmoid_like_record(1), 1)  # the same finding: no second event
    assert [(e["event"], e["epoch"]) for e in events(stream)] == [("health", 0)]

    resumed, stream = monitor([])
    resumed.resume(_sigmoid_like_record(4))  # a new attempt's record starts empty: say it once more
    assert [(e["epoch"], e.get("resumed")) for e in events(stream)] == [(4, True)]

    stopping, stream = monitor(["vanishing_gradient"])
    with pytest.raises(TrainingStopped) as stopped:
        stopping.check(_sigmoid_like_record(0), 0)
    assert stopped.value.exit_code is ExitCode.UNHEALTHY
    assert "vanishing_gradient (training.stop_on)" in stopped.value.detail and "Remedy:" in stopped.value.detail
    assert events(stream)[0]["event"] == "health"  # reported before the job stops
