"""``python -m worker.trainer`` end to end on CPU: artifacts, events, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from trainer_helpers import run_trainer, write_spec

from core.exitcodes import ExitCode

MLP = {
    "name": "cli-mlp",
    "architecture": {"family": "mlp", "widths": [32, 16], "dropout": 0.1},
    "training": {"epochs": 2, "batch_size": 32, "validation_split": 0.2, "seed": 3},
}


def test_happy_path_writes_every_artifact_and_only_json_events(tmp_path: Path, small_digits_h5: Path) -> None:
    spec = write_spec(tmp_path / "spec.json", MLP)
    out = tmp_path / "out"
    run = run_trainer(spec, small_digits_h5, out)
    assert run.returncode == 0, run.stderr[-3000:]

    names = [e["event"] for e in run.events]
    assert names[0] == "started" and names[-1] == "finished"
    assert names.count("epoch_start") == 2 and names.count("epoch_end") == 2 and names.count("checkpoint") == 2
    started = run.of("started")[0]
    assert started["family"] == "mlp" and started["backend"] == "tensorflow"
    assert started["rows"]["train"] == 320 and started["train_rows"] == 320 and started["parameters"] > 0
    assert started["env"]["environ"]["CUDA_VISIBLE_DEVICES"] == ""
    epoch_end = run.of("epoch_end")[-1]
    assert epoch_end["epoch"] == 2 and epoch_end["samples_per_s"] > 0 and epoch_end["eta_s"] == 0
    assert {"accuracy", "val_loss", "val_accuracy"} <= set(epoch_end["metrics"])
    finished = run.of("finished")[0]
    assert set(finished["metrics"]) == {"train", "val", "test"}
    assert 0 <= finished["metrics"]["test"]["accuracy"] <= 1

    for name in ("model.h5", "model.keras", "history.json", "diagnostics.json", "summary.json"):
        assert (out / name).is_file(), name
        assert name in finished["artifacts"]
    assert not list(out.glob(".*.tmp*")), "temporary files left behind"
    with h5py.File(out / "model.h5") as f:  # the legacy HDF5 format, not a zip
        assert "model_weights" in f
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2] and len(history["val_loss"]) == 2
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert [r["epoch"] for r in diagnostics] == [0, 1, 2]
    assert {"dense1", "dense2", "output"} <= set(diagnostics[0]["blocks"])
    # The same per-block figures, live, as one event per epoch (0 = before training).
    live = [(e["epoch"], e["blocks"]) for e in run.of("diagnostics")]
    assert live == [(r["epoch"], r["blocks"]) for r in diagnostics]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"]["name"] == "cli-mlp" and summary["parameters"] == started["parameters"]
    assert summary["dataset"]["sha256"] and summary["versions"]["keras"]
    assert summary["env"]["backend"] == "tensorflow" and summary["metrics"] == finished["metrics"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and (out / "checkpoint" / state["model"]).is_file()
    assert len(list((out / "checkpoint").glob("model-*.keras"))) == 1
    # Nothing but events on stdout; Keras' own logs went to stderr.
    assert all(line.startswith("{") for line in run.stdout.splitlines())


def test_bad_spec_exits_3_with_every_problem(tmp_path: Path, small_digits_h5: Path) -> None:
    bad = {"architecture": {"family": "mlp", "widths": [0]}, "training": {"epochs": 0}}
    run = run_trainer(write_spec(tmp_path / "spec.json", bad), small_digits_h5, tmp_path / "out")
    assert run.returncode == ExitCode.SPEC_INVALID
    failed = run.of("failed")[0]
    assert failed["reason"] == "spec_invalid"
    fields = {p.get("field") for p in failed["problems"]}
    assert {"architecture.widths.0", "training.epochs"} <= fields
    assert "Traceback" not in run.stdout


def test_hostile_data_exits_4(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.h5"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(64 * 50, dtype=np.float32).tobytes())
    with h5py.File(hostile, "w") as f:  # X_train reads another file on the host
        f.create_dataset("X_train", shape=(50, 64), dtype="f4", external=[(str(secret), 0, 64 * 50 * 4)])
        f.create_dataset("Y_train", data=np.zeros(50, dtype="i8"))
    run = run_trainer(write_spec(tmp_path / "spec.json", MLP), hostile, tmp_path / "out")
    assert run.returncode == ExitCode.DATASET_INVALID, run.stderr[-2000:]
    failed = run.of("failed")[0]
    assert failed["reason"] == "dataset_invalid" and failed["problems"]
    assert not (tmp_path / "out" / "model.h5").exists()


def test_missing_arguments_exit_2(tmp_path: Path) -> None:
    run = run_trainer(tmp_path / "nope.json", tmp_path / "nope.h5", tmp_path / "out", "--backend", "theano")
    assert run.returncode == ExitCode.USAGE
    assert run.stdout == ""


def test_spec_that_does_not_fit_the_data_exits_3(tmp_path: Path, small_digits_h5: Path) -> None:
    cnn = {"architecture": {"family": "cnn"}, "training": {"epochs": 1}}  # flat digits, cnn wants images
    run = run_trainer(write_spec(tmp_path / "spec.json", cnn), small_digits_h5, tmp_path / "out")
    assert run.returncode == ExitCode.SPEC_INVALID, run.stderr[-2000:]
    assert run.of("failed")[0]["problems"]


def test_time_limit_exits_7_with_a_checkpoint(tmp_path: Path, small_digits_h5: Path) -> None:
    spec = {**MLP, "training": {**MLP["training"], "epochs": 10_000}, "resources": {"max_runtime_s": 1}}
    out = tmp_path / "out"
    run = run_trainer(write_spec(tmp_path / "spec.json", spec), small_digits_h5, out)
    assert run.returncode == ExitCode.TIME_LIMIT, run.stderr[-2000:]
    assert run.of("failed")[0]["reason"] == "time_limit"
    assert (out / "checkpoint" / "state.json").is_file()


def test_dry_run_reports_without_training(tmp_path: Path, small_digits_h5: Path) -> None:
    out = tmp_path / "out"
    run = run_trainer(write_spec(tmp_path / "spec.json", MLP), small_digits_h5, out, "--dry-run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert [e["event"] for e in run.events] == ["dry_run"]
    report = run.events[0]["report"]
    assert report["ok"] and report["parameters"]["total"] > 0 and not report["errors"]
    assert not (out / "model.h5").exists()


def test_dry_run_of_a_spec_that_does_not_fit_exits_3(tmp_path: Path, small_digits_h5: Path) -> None:
    cnn = {"architecture": {"family": "cnn"}, "training": {"epochs": 1}}
    run = run_trainer(write_spec(tmp_path / "spec.json", cnn), small_digits_h5, tmp_path / "out", "--dry-run")
    assert run.returncode == ExitCode.SPEC_INVALID
    assert [e["event"] for e in run.events] == ["dry_run", "failed"]
    assert run.events[-1]["problems"]


@pytest.mark.parametrize(
    ("exception", "code"),
    [
        (MemoryError(), ExitCode.OUT_OF_MEMORY),
        (type("ResourceExhaustedError", (Exception,), {})("OOM when allocating"), ExitCode.OUT_OF_MEMORY),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), ExitCode.OUT_OF_MEMORY),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), ExitCode.OUT_OF_MEMORY),
        (ValueError("boom"), ExitCode.INTERNAL_ERROR),
    ],
)
def test_failures_map_to_exit_codes(exception: BaseException, code: ExitCode) -> None:
    from worker.trainer.cli import classify

    assert classify(exception) is code
    try:  # an OOM wrapped by Keras is still an OOM
        raise RuntimeError("fit failed") from exception
    except RuntimeError as wrapped:
        assert classify(wrapped) is code


@pytest.mark.parametrize("flag", ["--memory-fraction", "--gpu"])
def test_cli_overrides_are_validated_like_the_spec(tmp_path: Path, small_digits_h5: Path, flag: str) -> None:
    value = "7" if flag == "--memory-fraction" else "GPU-not-a-uuid"
    spec = write_spec(tmp_path / "spec.json", MLP)
    run = run_trainer(spec, small_digits_h5, tmp_path / "out", flag, value)
    assert run.returncode == ExitCode.SPEC_INVALID
    assert run.of("failed")[0]["problems"][0]["field"].startswith("resources.")
