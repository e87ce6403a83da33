"""Every example spec trains through the CLI; its model.h5 loads in a bare Keras interpreter."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import ROOT, run_trainer, write_spec

EXAMPLES = ROOT / "examples" / "specs"


def example_specs() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def is_image(spec: dict[str, Any]) -> bool:
    """Whether the example expects 8×8×1 digits (cnn, conv resnet, a keras_json model on images)."""
    arch = spec["architecture"]
    if arch.get("input_shape") is not None:
        return len(arch["input_shape"]) == 3
    if arch["family"] == "keras_json":
        config = arch["model_json"]
        config = json.loads(config) if isinstance(config, str) else config
        first = config["config"]["layers"][0]["config"]
        shape = first.get("batch_shape") or first.get("batch_input_shape") or [None, 64]
        return len(shape) == 4
    return arch["family"] == "cnn" or arch.get("variant") == "conv"


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    digits_h5: Path,
    small_digits_h5: Path,
    small_digits_image_h5: Path,
) -> dict[str, tuple[Path, Path]]:
    """Family example name → (output dir, data file), each trained once."""
    root = tmp_path_factory.mktemp("families")
    results = {}
    for path in example_specs():
        spec = json.loads(path.read_text())
        if path.stem == "highway":
            data = digits_h5  # the full spec on the full digits: it must reach 90 % test accuracy
        else:
            spec["training"]["epochs"] = 1
            data = small_digits_image_h5 if is_image(spec) else small_digits_h5
        out = root / path.stem
        run = run_trainer(write_spec(root / f"{path.stem}.json", spec), data, out)
        assert run.returncode == 0, f"{path.stem}: {run.stderr[-3000:]}"
        assert run.of("finished"), path.stem
        results[path.stem] = (out, data)
    return results


def test_every_family_has_an_example() -> None:
    names = {p.stem for p in example_specs()}
    assert {"mlp", "highway", "resnet_dense", "resnet_conv", "snn", "cnn", "keras_json"} <= names


def test_h5_models_load_in_bare_keras_and_predict_like_model_keras(trained: dict) -> None:
    jobs = {name: [str(out), str(data)] for name, (out, data) in trained.items()}
    script = textwrap.dedent(
        """
        import json, sys
        import h5py, keras, numpy as np
        jobs = json.loads(sys.argv[1])
        report = {}
        for name, (out, data) in jobs.items():
            with h5py.File(data, "r") as f:
                x = f["X_test"][:32]
            h5 = keras.models.load_model(out + "/model.h5")
            native = keras.models.load_model(out + "/model.keras")
            a, b = h5.predict(x, verbose=0), native.predict(x, verbose=0)
            report[name] = float(np.max(np.abs(a - b)))
        import importlib.util
        leaked = [m for m in ("models", "worker", "service") if importlib.util.find_spec(m) is not None]
        print(json.dumps({"max_abs_diff": report, "gpuyard_modules": leaked}))
        """
    )
    # An interpreter where gpuyard cannot even be imported: no site processing (the editable install's
    # .pth is not read), the venv's site-packages alone on its path, and / as its working directory.
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    environ.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=site.getsitepackages()[0])
    out = subprocess.run(
        [sys.executable, "-S", "-c", script, json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd="/",
        env=environ,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gpuyard_modules"] == []
    assert set(result["max_abs_diff"]) == set(trained)
    for name, diff in result["max_abs_diff"].items():
        assert diff <= 1e-5, name


def test_highway_example_reaches_90_percent_on_digits(trained: dict) -> None:
    out, _ = trained["highway"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["test"]["accuracy"] >= 0.9
