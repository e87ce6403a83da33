"""gpuyard smoke: a CI pipeline's check of a spec on a CPU-only runner."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from cli.smoke import EXIT_CODES

HIGHWAY = Path(__file__).resolve().parents[2] / "examples" / "specs" / "highway.json"
pytestmark = pytest.mark.slow


def smoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["smoke", *args])
    return result.exit_code, result.output


def lab_gpus(tmp_path: Path, *sizes_gib: float) -> Path:
    """A saved GET /v1/gpus answer with GPUs of these sizes."""
    gpus = [
        {"uuid": f"GPU-00000000-0000-0000-0000-{i:012d}", "memory_total_bytes": int(size * 2**30), "state": "online"}
        for i, size in enumerate(sizes_gib)
    ]
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": gpus}))
    return path


def test_the_highway_example_passes_every_check(tmp_path: Path, digits_h5: Path) -> None:
    junit = tmp_path / "smoke.xml"
    started = time.monotonic()
    code, output = smoke(str(HIGHWAY), "--data", str(digits_h5), "--gpus", str(lab_gpus(tmp_path, 80)),
                         "--junit", str(junit))  # fmt: skip
    print(f"\ngpuyard smoke on the highway example: {time.monotonic() - started:.1f} s")
    assert code == 0, output
    suite = ET.parse(junit).getroot()
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names == list(EXIT_CODES) and suite.get("failures") == "0"


def test_a_nan_loss_fails_with_its_own_code(tmp_path: Path, digits_h5: Path) -> None:
    spec = json.loads(HIGHWAY.read_text())
    spec["training"]["optimizer"] = {"name": "sgd", "learning_rate": 1e6}
    path = tmp_path / "exploding.json"
    path.write_text(json.dumps(spec))
    code, output = smoke(str(path), "--data", str(digits_h5))
    assert code == EXIT_CODES["loss_finite"], output
    assert "loss_finite failed" in output and "not finite" in output


def test_a_budget_too_small_on_every_lab_gpu_fails_before_training(tmp_path: Path, digits_h5: Path) -> None:
    spec = json.loads(HIGHWAY.read_text())
    spec["architecture"]["width"] = 4096  # about 1 GiB to train at batch 32 with Adam
    spec["resources"] = {"memory_fraction": 0.02}  # at most 328 MiB on the 16 GiB GPU
    path = tmp_path / "big.json"
    path.write_text(json.dumps(spec))
    junit = tmp_path / "smoke.xml"
    started = time.monotonic()
    code, output = smoke(str(path), "--data", str(digits_h5), "--gpus", str(lab_gpus(tmp_path, 8, 16)),
                         "--junit", str(junit))  # fmt: skip
    assert code == EXIT_CODES["budget_fits"], output
    assert "budget_fits failed" in output and "ask for memory_fraction" in output
    assert time.monotonic() - started < 30  # no training happened
    cases = ET.parse(junit).getroot().iter("testcase")
    assert [case.get("name") for case in cases if case.find("failure") is not None] == ["budget_fits"]


def test_a_gpu_the_lab_does_not_have_is_named(tmp_path: Path, digits_h5: Path) -> None:
    spec = json.loads(HIGHWAY.read_text())
    spec["resources"] = {"gpu": "GPU-11111111-2222-3333-4444-555555555555"}
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps(spec))
    code, output = smoke(str(path), "--data", str(digits_h5), "--gpus", str(lab_gpus(tmp_path, 80)))
    assert code == EXIT_CODES["gpu_exists"] and "GPU-11111111" in output
