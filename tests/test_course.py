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


def test_service_mode_follows_the_job_and_downloads_its_artifacts(course: ModuleType, tmp_path: Path) -> None:
    """``run --service``: submit through the client, keep the events until the terminal one, fetch the files."""
    from service.client import Event

    class FakeClient:
        def __init__(self) -> None:
            self.downloaded: list[str] = []

        def submit(self, dataset: str, spec: dict) -> dict:
            assert dataset == "ds_1" and spec["name"]
            return {"id": "job_1"}

        def events(self, job_id: str):
            yield Event(event="health", data=json.dumps({"event": "health", "epoch": 0, "findings": []}), id="1")
            yield Event(event="state", data=json.dumps({"event": "state", "state": "succeeded"}), id="2")
            raise AssertionError("read past the terminal event")

        def job(self, job_id: str) -> dict:
            return {"id": job_id, "state": "succeeded", "health": []}

        def download(self, job_id: str, name: str, dest: Path) -> Path:
            self.downloaded.append(name)
            Path(dest).write_text("{}")
            return Path(dest)

    client = FakeClient()
    spec = course.course_specs()["f_snn_8"]
    state = course.run_service(client, "ds_1", spec, tmp_path / "job")
    assert state == "succeeded"
    events = (tmp_path / "job" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in events] == ["health", "state"]
    assert client.downloaded == ["history.json", "diagnostics.json", "summary.json"]
