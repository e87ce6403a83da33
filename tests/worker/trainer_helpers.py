"""Helpers of the trainer tests: a runner for ``python -m worker.trainer`` and small data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def trainer_env(**extra: str) -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": python_path, **extra}
    environ.pop("KERAS_BACKEND", None)
    return environ


@dataclass
class TrainerRun:
    returncode: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line must be one JSON object with ``event`` and ``time``."""
    events = []
    for line in stdout.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record and "time" in record, line
        events.append(record)
    return events


def trainer_command(spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker.trainer",
        "--spec", str(spec), "--data", str(data), "--out", str(out), "--gpu", "cpu", *extra,
    ]  # fmt: skip


def run_trainer(spec: Path, data: Path, out: Path, *extra: str, timeout: float = 300) -> TrainerRun:
    result = subprocess.run(
        trainer_command(spec, data, out, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=trainer_env(),
        timeout=timeout,
    )
    return TrainerRun(result.returncode, parse_events(result.stdout), result.stdout, result.stderr)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def subset_h5(source: Path, target: Path, *, train_rows: int, test_rows: int) -> Path:
    """A smaller copy of a digits file (the CPU budget of the test suite)."""
    import h5py

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key in src:
            rows = train_rows if key.endswith("_train") else test_rows
            dst.create_dataset(key, data=src[key][:rows])
    return target
