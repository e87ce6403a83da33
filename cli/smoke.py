"""``gpuyard smoke``: a CI pipeline's check of a spec on a CPU-only runner, in seconds, before it goes to the lab.

Checks, in order; the first that fails ends the run with its own exit code and reason:

    spec_valid        the spec parses (every problem listed)                              exit 10
    data_valid        the data set passes the upload checks (sandboxed)                   exit 11
    spec_fits_data    the spec fits the data (shapes, classes, loss)                      exit 12
    gpu_exists        --gpus: the GPU the spec names is one of the lab's                  exit 13
    budget_fits       --gpus: memory_fraction × a GPU's memory covers the estimated       exit 14
                      training memory on at least one of the lab's GPUs
    trains            the real trainer, on the CPU, on --rows rows for --epochs epochs    exit 15
    loss_finite       every epoch's loss is finite                                        exit 16
    loss_decreases    the last epoch's loss is below the first's                          exit 17
    h5_loads          model.h5 loads in plain Keras and predicts as model.keras does      exit 18

The placement checks run before any training. ``--junit FILE`` writes a JUnit report for CI systems.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import h5py

from core.errors import DataError, SpecError
from core.names import MODEL_H5, MODEL_KERAS, SPEC_FILE
from core.settings import get_settings
from core.trainer import FAILED_EVENT, trainer_argv
from models.data.sandbox import check_file
from models.data.summary import DatasetSummary
from models.fit import spec_data_problems
from models.size import estimated_training_bytes, model_size
from models.spec import AUTO, JobSpec, parse_spec
from worker.gpus import budget_bytes, fraction_for

EXIT_CODES = {
    "spec_valid": 10,
    "data_valid": 11,
    "spec_fits_data": 12,
    "gpu_exists": 13,
    "budget_fits": 14,
    "trains": 15,
    "loss_finite": 16,
    "loss_decreases": 17,
    "h5_loads": 18,
}
_SPLITS = (("x_train", "y_train"), ("x_val", "y_val"), ("x_test", "y_test"))


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class SmokeRun:
    checks: list[Check] = field(default_factory=list)

    def record(self, name: str, ok: bool, detail: str, started: float) -> bool:
        self.checks.append(Check(name, ok, detail, round(time.monotonic() - started, 3)))
        mark = click.style("ok  ", fg="green") if ok else click.style("FAIL", fg="red")
        click.echo(f"{mark} {name}: {detail}", err=True)
        return ok

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    def junit(self, path: Path) -> None:
        failures = sum(not c.ok for c in self.checks)
        suite = ET.Element(
            "testsuite",
            name="gpuyard smoke",
            tests=str(len(self.checks)),
            failures=str(failures),
            time=f"{sum(c.seconds for c in self.checks):.3f}",
        )
        for check in self.checks:
            case = ET.SubElement(suite, "testcase", classname="gpuyard.smoke", name=check.name, time=f"{check.seconds}")
            if not check.ok:
                ET.SubElement(case, "failure", message=check.detail).text = check.detail
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


@click.command("smoke")
@click.argument("spec_file", metavar="SPEC.json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The HDF5 data set (or a sample of it) the spec trains on.")  # fmt: skip
@click.option("--rows", default=256, show_default=True, type=click.IntRange(min=8), help="Training rows used.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=2), help="Epochs trained.")
@click.option("--gpus", "gpus_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The lab's GET /v1/gpus answer as JSON: check the spec's GPU and budget against it.")  # fmt: skip
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a JUnit report.")
def smoke_command(
    spec_file: Path, data_path: Path, rows: int, epochs: int, gpus_path: Path | None, junit_path: Path | None
) -> None:
    """Check SPEC.json on a CPU-only runner: valid, fits the data, fits the lab's GPUs, trains a few epochs
    with a finite, falling loss, and gives a model.h5 plain Keras loads. Exit 0, or the failed check's code."""
    run = SmokeRun()
    try:
        _run_checks(run, spec_file, data_path, rows, epochs, gpus_path)
    finally:
        if junit_path is not None:
            run.junit(junit_path)
    failed = run.failed
    if failed is not None:
        click.echo(f"smoke: {failed.name} failed: {failed.detail}", err=True)
        sys.exit(EXIT_CODES[failed.name])
    click.echo(f"smoke: all {len(run.checks)} checks passed", err=True)


def _run_checks(run: SmokeRun, spec_file: Path, data_path: Path, rows: int, epochs: int, gpus: Path | None) -> None:
    started = time.monotonic()
    try:
        raw = json.loads(spec_file.read_text())
        spec = parse_spec(raw)
    except (ValueError, SpecError) as exc:
        run.record("spec_valid", False, str(exc), started)
        return
    run.record("spec_valid", True, f"{spec.architecture.family}", started)

    started = time.monotonic()
    try:
        summary = check_file(data_path, spec.data, limits=get_settings())
    except DataError as exc:
        run.record("data_valid", False, str(exc), started)
        return
    run.record("data_valid", True, f"{summary.rows} rows, input {tuple(summary.input_shape)}", started)

    started = time.monotonic()
    problems = spec_data_problems(spec, summary)
    if not run.record("spec_fits_data", not problems, "; ".join(p.detail for p in problems) or "yes", started):
        return
    if gpus is not None and not _placement(run, spec, summary, gpus):
        return
    checker = PlainKerasCheck()  # imports Keras while the trainer trains: the two overlap on two cores
    try:
        with tempfile.TemporaryDirectory(prefix="gpuyard-smoke-") as tmp:
            _train_and_load(run, raw, summary, data_path, Path(tmp), rows, epochs, checker)
    finally:
        checker.close()


def _placement(run: SmokeRun, spec: JobSpec, summary: DatasetSummary, gpus_path: Path) -> bool:
    started = time.monotonic()
    try:
        listed = json.loads(gpus_path.read_text())["gpus"]
        gpus = {g["uuid"]: int(g["memory_total_bytes"]) for g in listed}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return run.record("gpu_exists", False, f"{gpus_path} is not a GET /v1/gpus answer ({exc})", started)
    wanted = spec.resources.gpu
    if wanted == "cpu":
        return run.record("gpu_exists", True, "the spec asks for the CPU", started)
    if wanted != "any" and wanted not in gpus:
        detail = f"resources.gpu {wanted} is not among the lab's GPUs: {', '.join(gpus) or 'none'}"
        return run.record("gpu_exists", False, detail, started)
    run.record("gpu_exists", True, f"{len(gpus)} GPU(s) listed", started)

    started = time.monotonic()
    size = model_size(spec, list(summary.input_shape), summary.output_dim)
    if size is None:
        return run.record("budget_fits", True, "keras_json: no estimate, not checked", started)
    need = estimated_training_bytes(spec, size)
    # 'auto' is sized at submit to fit the model: it fits when a whole GPU does.
    fraction = 1.0 if spec.resources.memory_fraction == AUTO else spec.resources.fraction
    candidates = {u: t for u, t in gpus.items() if wanted in ("any", u)}
    # The share the trainer's framework is capped at: the budget formula without the watchdog's allowance
    # (that covers the CUDA context, not the model).
    budgets = {u: budget_bytes(fraction, t, allowance_bytes=0) for u, t in candidates.items()}
    fitting = [u for u, b in budgets.items() if b >= need]
    best = max(budgets.values(), default=0)
    detail = (
        f"estimated training memory {need / 2**20:,.1f} MiB; the budget (memory_fraction {fraction:g} × a GPU) "
        f"is at most {best / 2**20:,.0f} MiB"
    )
    if not fitting and candidates:
        biggest = max(candidates.values())
        detail += f"; ask for memory_fraction ≥ {fraction_for(need, biggest, allowance_bytes=0, margin=1.0):g}"
    return run.record("budget_fits", bool(fitting), detail, started)


def _subsample(data_path: Path, summary: DatasetSummary, out: Path, rows: int) -> Path:
    """The first ``rows`` training rows (and as many validation/test rows, at most) in a new file."""
    keys = summary.keys
    with h5py.File(data_path, "r") as source, h5py.File(out, "w") as target:
        for x_role, y_role in _SPLITS:
            if x_role not in summary.arrays:
                continue
            for role in (x_role, y_role):
                key = getattr(keys, role)
                target.create_dataset(key, data=source[key][:rows])
    return out


def _train_and_load(
    run: SmokeRun,
    raw: dict[str, Any],
    summary: DatasetSummary,
    data_path: Path,
    tmp: Path,
    rows: int,
    epochs: int,
    checker: PlainKerasCheck,
) -> None:
    started = time.monotonic()
    sample = _subsample(data_path, summary, tmp / "sample.h5", rows)
    training = {**raw.get("training", {}), "epochs": epochs, "early_stopping": None}
    smoke_spec = {**raw, "training": training, "resources": {**raw.get("resources", {}), "gpu": "cpu"}}
    spec_path = tmp / SPEC_FILE
    spec_path.write_text(json.dumps(smoke_spec))
    out = tmp / "out"
    command = trainer_argv(spec=spec_path, data=sample, out=out, gpu="cpu")
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    losses = [e.get("loss") for e in events if e.get("event") == "epoch_end"]
    failed = next((e for e in events if e.get("event") == FAILED_EVENT), None)
    if (failed is not None and failed.get("reason") == "loss_not_finite") or any(
        loss is None or not math.isfinite(loss) for loss in losses
    ):
        run.record("trains", True, f"{len(losses)} epoch(s) ran", started)
        run.record("loss_finite", False, f"epoch losses {losses}: not finite (learning rate too high?)", started)
        return
    if done.returncode != 0:
        reason = (failed or {}).get("detail") or done.stderr.strip().splitlines()[-1:] or ["no output"]
        run.record("trains", False, f"the trainer exited with {done.returncode}: {reason}", started)
        return
    run.record("trains", True, f"{len(losses)} epochs on {rows} rows in {time.monotonic() - started:.1f} s", started)
    run.record("loss_finite", True, f"losses {[round(x, 4) for x in losses]}", started)
    if not run.record("loss_decreases", losses[-1] < losses[0], f"{losses[0]:.4f} → {losses[-1]:.4f}", started):
        return
    started = time.monotonic()
    run.record(*checker.h5_loads(out, sample, summary), started)


#: Loads model.h5 with plain Keras (no gpuyard code on its path: it runs from /) and compares its predictions
#: with model.keras'. It imports Keras first, then waits for its job: one JSON line of the four arguments.
_H5_CHECK = textwrap.dedent(
    """
    import json, sys
    import h5py, keras, numpy as np
    line = sys.stdin.readline()
    if not line.strip():
        sys.exit(0)
    h5_path, keras_path, data, key = json.loads(line)
    with h5py.File(data, "r") as f:
        x = f[key][:32]
    a = keras.models.load_model(h5_path).predict(x, verbose=0)
    b = keras.models.load_model(keras_path).predict(x, verbose=0)
    print(json.dumps({"max_abs_diff": float(np.max(np.abs(a - b)))}))
    """
)


class PlainKerasCheck:
    """The ``h5_loads`` check's plain-Keras process, started ahead so that its import overlaps training."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _H5_CHECK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"},
        )

    def h5_loads(self, out: Path, sample: Path, summary: DatasetSummary) -> tuple[str, bool, str]:
        """Load model.h5 with plain Keras and compare its predictions with model.keras'."""
        job = json.dumps([str(out / MODEL_H5), str(out / MODEL_KERAS), str(sample), summary.keys.x_train])
        stdout, stderr = self.process.communicate(job + "\n")
        if self.process.returncode != 0:
            return "h5_loads", False, f"plain Keras could not load {MODEL_H5}: {stderr.strip()[-500:]}"
        diff = json.loads(stdout.strip().splitlines()[-1])["max_abs_diff"]
        return "h5_loads", diff <= 1e-5, f"{MODEL_H5} predicts as {MODEL_KERAS} does (max |Δ| {diff:.2g})"

    def close(self) -> None:
        """End the process unless :meth:`h5_loads` already ran it (it may still be importing)."""
        if self.process.returncode is None:
            self.process.kill()
            self.process.communicate()
