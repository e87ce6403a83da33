"""SIGTERM/SIGINT: the trainer checkpoints, reports ``cancelled`` and exits 6 within seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from trainer_helpers import ROOT, parse_events, trainer_command, trainer_env, write_spec

from core.exitcodes import ExitCode

LONG = {
    "name": "long",
    "architecture": {"family": "mlp", "widths": [32]},
    "training": {"epochs": 10_000, "batch_size": 16, "seed": 1},
}


def signal_after(spec: Path, data: Path, out: Path, event_name: str, signum: int) -> tuple[int, float, list]:
    process = subprocess.Popen(
        trainer_command(spec, data, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=trainer_env(),
    )
    assert process.stdout is not None
    lines = []
    sent = None
    for line in process.stdout:
        lines.append(line)
        if json.loads(line)["event"] == event_name:
            process.send_signal(signum)
            sent = time.monotonic()
            break
    lines += process.stdout.readlines()
    code = process.wait(timeout=60)
    assert sent is not None, "".join(lines)
    return code, time.monotonic() - sent, parse_events("".join(lines))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_training_checkpoints_and_exits_6(tmp_path: Path, small_digits_h5: Path, signum: int) -> None:
    out = tmp_path / "out"
    code, seconds, events = signal_after(
        write_spec(tmp_path / "spec.json", LONG), small_digits_h5, out, "epoch_end", signum
    )
    assert code == ExitCode.CANCELLED
    assert seconds < 10
    failed = events[-1]
    assert failed["event"] == "failed" and failed["reason"] == "cancelled"
    assert signal.Signals(signum).name in failed["detail"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] >= 1 and (out / "checkpoint" / state["model"]).is_file()
    assert not (out / "model.h5").exists()


def test_signal_before_the_first_epoch_still_leaves_a_checkpoint(tmp_path: Path, small_digits_h5: Path) -> None:
    out = tmp_path / "out"
    code, _, events = signal_after(
        write_spec(tmp_path / "spec.json", LONG), small_digits_h5, out, "started", signal.SIGTERM
    )
    assert code == ExitCode.CANCELLED
    assert events[-1]["reason"] == "cancelled"
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (out / "checkpoint" / state["model"]).is_file()
    assert state["partial_epoch"] or state["epoch"] >= 1
