"""examples/course/run.py: the committed specs are the generator's, they parse, and the report is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from models.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def course() -> ModuleType:
    loader = importlib.util.spec_from_file_location("course_run", ROOT / "examples" / "course" / "run.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_committed_specs_are_the_generated_ones_and_parse(course: ModuleType) -> None:
    committed = course.load_specs()
    assert committed == course.course_specs()
    assert len(committed) == 6 * 3
    for name, spec in committed.items():
        parsed = parse_spec(spec)
        assert parsed.training.optimizer.name == "sgd" and parsed.training.optimizer.momentum == 0, name


def test_report_from_runs(course: ModuleType, tmp_path: Path) -> None:
    """Fake runs with the trainer's artifact layout: the report has its tables, plots and health column."""
    pytest.importorskip("matplotlib")
    for dataset in course.DATASETS:
        for name in course.course_specs():
            out = tmp_path / "runs" / dataset / name
            out.mkdir(parents=True)
            sigmoid = name.startswith("a_")
            depth = int(name.rsplit("_", 1)[1])
            records = [
                {"epoch": epoch, "probe_loss": 2.3, "gradient_norms": {}, "blocks": {
                    **{f"dense{i}": {"gradient_norm": (0.25 ** (depth - i) if sigmoid else 1.0), "parameters": 10}
                       for i in range(1, depth + 1)},
                    "output": {"gradient_norm": 1.0, "parameters": 10}}}
                for epoch in range(3)
            ]  # fmt: skip
            (out / "diagnostics.json").write_text(json.dumps(records))
            (out / "history.json").write_text(json.dumps({"epoch": [1, 2], "loss": [2.0, 1.0], "val_loss": [2.1, 1.2]}))
            accuracy = 0.1 if sigmoid else 0.95
            (out / "summary.json").write_text(json.dumps({"metrics": {"test": {"accuracy": accuracy}}}))
            (out / "events.jsonl").write_text("")
    report = course.write_report(tmp_path, mode="trainer", report_dir=tmp_path / "report")
    text = report.read_text()
    assert "| (f) SNN (selu, lecun_normal) | 0.950 | 0.950 | 0.950 |" in text
    assert "| (a) sigmoid MLP, Xavier | 0.100 |" in text
    assert "epoch 0: vanishing_gradient" in text  # computed from the records when no health events were saved
    for png in ("test_accuracy.png", "gradients_epoch0_digits.png", "ratio_per_epoch_breast_cancer.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
