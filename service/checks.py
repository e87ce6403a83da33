"""The checks the API runs out of process: the sandboxed HDF5 validator and the trainer's dry run.

Both run in child processes, so the API process never opens an untrusted HDF5 file itself and never
imports a deep-learning framework.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.errors import DataError, Problem, SpecError
from core.exitcodes import ExitCode
from core.names import DATASET_SUMMARY_FILE
from core.settings import Settings
from models.data.sandbox import check_file
from models.data.summary import DataKeys, DatasetSummary
from service.errors import DryRunFailed
from worker.trainer.events import FAILED_EVENT


def sandbox_check_dataset(
    path: Path, keys: DataKeys, sha256: str | None = None, *, settings: Settings
) -> DatasetSummary:
    """Validate an uploaded HDF5 file in the sandboxed child process, under ``settings``' limits.

    ``sha256`` is the file's hash when the caller has it (the upload hashed it while streaming).

    Raises:
        DataError: every reason the file is refused.
    """
    return check_file(path, keys, limits=settings, sha256=sha256)


def trainer_dry_run(
    spec: dict[str, Any], data_path: Path, summary: DatasetSummary, *, timeout_s: float
) -> dict[str, Any]:
    """Run ``python -m worker.trainer --dry-run`` on a spec and a stored data set; return its report.

    Args:
        spec: the job spec as submitted (already validated by parse_spec).
        data_path: the stored HDF5 file.
        summary: its checked summary for the spec's keys (the trainer verifies the sha256, scans nothing).
        timeout_s: seconds before the child is killed.

    Returns:
        The ``dry_run`` event's fields (``report``: parameters, layer table, memory estimate, warnings;
        ``env``: the environment the trainer would use).

    Raises:
        SpecError / DataError: the trainer refused the spec or the data (every problem listed).
        DryRunFailed: the child crashed or ran past ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="gpuyard-dryrun-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        summary_path = Path(tmp) / DATASET_SUMMARY_FILE
        summary_path.write_text(summary.model_dump_json())
        command = [
            sys.executable, "-m", "worker.trainer", "--dry-run",
            "--spec", str(spec_path), "--data", str(data_path), "--summary", str(summary_path),
            "--out", str(Path(tmp) / "out"),
        ]  # fmt: skip
        # A dry run builds on the CPU; hide GPUs so it never takes memory from running jobs.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise DryRunFailed(f"the dry run took longer than {timeout_s:g} s") from exc
    events = [_parse(line) for line in done.stdout.splitlines() if line.strip()]
    for event in events:
        if event.get("event") == "dry_run":
            return {k: v for k, v in event.items() if k not in ("event", "time")}
    failed = next((e for e in reversed(events) if e.get("event") == FAILED_EVENT), None)
    if failed is not None:
        problems = [
            Problem(p.get("code", "invalid"), p.get("detail", ""), p.get("field"))
            for p in failed.get("problems", [])
        ] or [Problem(failed.get("reason", "invalid"), failed.get("detail", "the dry run failed"))]
        if done.returncode == ExitCode.SPEC_INVALID:
            raise SpecError(problems)
        if done.returncode == ExitCode.DATASET_INVALID:
            raise DataError(problems)
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    raise DryRunFailed(f"the dry run ended with exit code {done.returncode}: {tail[0][:300]}")


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
