"""A run interrupted by SIGTERM and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import ROOT, parse_events, run_trainer, trainer_command, trainer_env, write_spec

from core.exitcodes import ExitCode

SPEC = {
    "name": "resume",
    # Dropout makes the run depend on the random seed generators' state, shuffle on the epoch.
    "architecture": {"family": "mlp", "widths": [32, 32], "dropout": 0.3},
    "training": {
        "epochs": 4,
        "batch_size": 8,
        "validation_split": 0.2,
        "seed": 11,
        "shuffle": True,
        "optimizer": {"name": "adam", "learning_rate": 0.003},
    },
}


def weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(path).get_weights()


def interrupt_after_checkpoint(spec: Path, data: Path, out: Path, epoch: int, *extra: str) -> tuple[int, list[dict]]:
    """Run the trainer and send SIGTERM as soon as the checkpoint of ``epoch`` is announced."""
    process = subprocess.Popen(
        trainer_command(spec, data, out, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=trainer_env(),
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        event = json.loads(line)
        if event["event"] == "checkpoint" and event["epoch"] == epoch:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    return process.wait(timeout=60), parse_events("".join(lines))


JAX_AVAILABLE = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    ["tensorflow", pytest.param("jax", marks=pytest.mark.skipif(not JAX_AVAILABLE, reason="no jax"))],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, small_digits_h5: Path, backend: str) -> None:
    spec = write_spec(tmp_path / "spec.json", SPEC)
    flags = ("--backend", backend)
    straight = run_trainer(spec, small_digits_h5, tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "interrupted"
    code, events = interrupt_after_checkpoint(spec, small_digits_h5, out, 2, *flags)
    assert code == ExitCode.CANCELLED
    assert events[-1]["event"] == "failed" and events[-1]["reason"] == "cancelled"
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 2 <= state["epoch"] < 4 and not state["partial_epoch"]

    resumed = run_trainer(spec, small_digits_h5, out, "--resume", *flags)
    assert resumed.of("started")[0]["backend"] == backend
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.of("started")[0]["resumed_from_epoch"] == state["epoch"]
    assert [e["epoch"] for e in resumed.of("epoch_end")] == list(range(state["epoch"] + 1, 5))

    for a, b in zip(weights(tmp_path / "straight" / "model.h5"), weights(out / "model.h5"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    history_a = json.loads((tmp_path / "straight" / "history.json").read_text())
    history_b = json.loads((out / "history.json").read_text())
    assert history_b["epoch"] == [1, 2, 3, 4]
    np.testing.assert_allclose(history_a["val_loss"], history_b["val_loss"], atol=1e-5)
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert [r["epoch"] for r in diagnostics] == [0, 1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path: Path, small_digits_h5: Path) -> None:
    out = tmp_path / "out"
    first = {**SPEC, "training": {**SPEC["training"], "epochs": 1, "batch_size": 64}}
    assert run_trainer(write_spec(tmp_path / "a.json", first), small_digits_h5, out).returncode == 0
    other = {**first, "architecture": {**SPEC["architecture"], "widths": [16]}}
    run = run_trainer(write_spec(tmp_path / "b.json", other), small_digits_h5, out, "--resume")
    assert run.returncode == ExitCode.SPEC_INVALID
    assert run.of("failed")[0]["problems"][0]["code"] == "checkpoint_mismatch"
