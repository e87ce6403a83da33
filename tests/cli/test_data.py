"""`gpuyard check-data`: JSON summary and exit 0, or every reason as JSON and on stderr with exit 2."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

_HOSTILE = Path(__file__).resolve().parents[1] / "models" / "data" / "hostile.py"
_spec = importlib.util.spec_from_file_location("gpuyard_test_hostile", _HOSTILE)
assert _spec and _spec.loader
hostile = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = hostile
_spec.loader.exec_module(hostile)


def test_good_file_prints_the_summary(tmp_path: Path) -> None:
    path = hostile.write_good(tmp_path / "good.h5", val=True)
    result = CliRunner().invoke(main, ["check-data", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == {"train": 40, "val": 10, "test": 12}
    assert summary["target"] == "integer_labels" and summary["input_shape"] == [4]


def test_keys_from_options(tmp_path: Path) -> None:
    path = hostile.write_good(tmp_path / "good.h5", test=False)
    args = [
        "check-data",
        str(path),
        "--keys-json",
        '{"x_train": "X_train"}',
        "--y-train",
        "Y_train",
        "--num-classes",
        "5",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_classes"] == 5


@pytest.mark.parametrize("name", ["not_hdf5", "external_link", "nan_late", "missing_key", "declared_4tb"])
def test_hostile_file_exits_2_with_its_reasons(name: str, tmp_path: Path) -> None:
    case = hostile.CASES[name]
    path = case.build(tmp_path)
    args = ["check-data", str(path)]
    if case.keys.get("num_classes"):
        args += ["--num-classes", str(case.keys["num_classes"])]
    result = CliRunner().invoke(
        main, args, env={f"GPUYARD_{k.upper()}": str(v) for k, v in case.limits.items()}
    )
    assert result.exit_code == 2, result.output
    reply = json.loads(result.stdout)
    assert reply["error"] == "dataset_invalid"
    assert case.code in [p["code"] for p in reply["problems"]]
    assert f"{case.code}" in result.stderr and "Traceback" not in result.stderr
    for text in case.mentions:
        assert text in result.stderr


def test_distinct_files_give_distinct_messages(tmp_path: Path) -> None:
    outputs = set()
    for name in ("not_hdf5", "truncated", "external_storage", "negative_label"):
        folder = tmp_path / name
        folder.mkdir()
        result = CliRunner().invoke(main, ["check-data", str(hostile.CASES[name].build(folder))])
        assert result.exit_code == 2
        outputs.add(result.stderr)
    assert len(outputs) == 4


def test_bad_keys_json_is_a_usage_error(tmp_path: Path) -> None:
    path = hostile.write_good(tmp_path / "good.h5")
    result = CliRunner().invoke(main, ["check-data", str(path), "--keys-json", '{"x_trian": "X"}'])
    assert result.exit_code == 2
    assert "x_trian" in result.stderr and "Traceback" not in result.output
