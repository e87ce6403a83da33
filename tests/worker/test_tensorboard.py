"""A job's tensorboard.zip: event files TensorBoard's readers (tbparse) read, once per step across a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from tbparse import SummaryReader
from trainer_helpers import ROOT, parse_events, trainer_command, trainer_env, write_spec

from core.exitcodes import ExitCode
from core.names import TENSORBOARD_DIR, TENSORBOARD_ZIP

SPEC = {
    "name": "tensorboard",
    "architecture": {"family": "highway", "depth": 2, "width": 32},
    "training": {"epochs": 4, "batch_size": 32, "validation_split": 0.2, "seed": 3},
}
ENV = {"GPUYARD_TENSORBOARD_HISTOGRAM_EVERY": "2"}


def read_zip(archive: Path, into: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scalars, histograms) of the event files in ``archive``, as tbparse reads them."""
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(into)
    scalars = SummaryReader(str(into), event_types={"scalars"}).scalars
    histograms = SummaryReader(str(into), event_types={"histograms"}).histograms
    return scalars, histograms


def steps(frame: pd.DataFrame, tag: str) -> list[int]:
    return sorted(int(s) for s in frame[frame["tag"] == tag]["step"])


def run(spec: Path, data: Path, out: Path, *extra: str, stop_after_checkpoint: int | None = None) -> tuple[int, list]:
    process = subprocess.Popen(
        trainer_command(spec, data, out, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=trainer_env(**ENV),
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        event = json.loads(line)
        if event["event"] == "checkpoint" and event["epoch"] == stop_after_checkpoint:
            process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120), parse_events("".join(lines))


@pytest.mark.slow
def test_tensorboard_zip_holds_loss_gradients_and_histograms(tmp_path: Path, small_digits_h5: Path) -> None:
    """About 10 s: one 4-epoch Highway job on 400 rows."""
    out = tmp_path / "out"
    code, events = run(write_spec(tmp_path / "spec.json", SPEC), small_digits_h5, out)
    assert code == 0, events[-1]
    finished = events[-1]
    assert finished["event"] == "finished" and TENSORBOARD_ZIP in finished["artifacts"]

    scalars, histograms = read_zip(out / TENSORBOARD_ZIP, tmp_path / "logs")
    assert steps(scalars, "epoch/loss") == [1, 2, 3, 4]
    assert steps(scalars, "epoch/val_loss") == [1, 2, 3, 4]
    assert steps(scalars, "speed/samples_per_s") == [1, 2, 3, 4]
    # The diagnostics before training (step 0) and after every epoch: the ratio and each layer's norm.
    assert steps(scalars, "gradients/first_last_ratio") == [0, 1, 2, 3, 4]
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    layers = sorted(diagnostics[-1]["gradient_norms"])
    for layer in layers:
        assert steps(scalars, f"gradients/{layer}") == [0, 1, 2, 3, 4], layer
    last = scalars[(scalars["tag"] == f"gradients/{layers[0]}") & (scalars["step"] == 4)]["value"].item()
    assert last == pytest.approx(diagnostics[-1]["gradient_norms"][layers[0]], rel=1e-5)
    history = json.loads((out / "history.json").read_text())
    logged = scalars[scalars["tag"] == "epoch/loss"].sort_values("step")["value"].tolist()
    assert logged == pytest.approx(history["loss"], rel=1e-5)
    # Histograms every 2 epochs (and before training, and at the last epoch): weights and block outputs.
    weight_tags = {t for t in histograms["tag"] if t.startswith("weights/")}
    activation_tags = {t for t in histograms["tag"] if t.startswith("activations/")}
    assert weight_tags and activation_tags
    assert steps(histograms, sorted(weight_tags)[0]) == [0, 2, 4]
    assert steps(histograms, sorted(activation_tags)[0]) == [0, 2, 4]


@pytest.mark.slow
def test_a_resumed_job_appends_each_step_once(tmp_path: Path, small_digits_h5: Path) -> None:
    """About 15 s: the job is stopped after epoch 2's checkpoint, then resumed to epoch 4."""
    spec = write_spec(tmp_path / "spec.json", SPEC)
    out = tmp_path / "out"
    code, _ = run(spec, small_digits_h5, out, stop_after_checkpoint=2)
    assert code == ExitCode.CANCELLED
    stopped, _ = read_zip(out / TENSORBOARD_ZIP, tmp_path / "stopped")  # a stopped attempt leaves its logs too
    assert steps(stopped, "epoch/loss") == [1, 2]

    code, events = run(spec, small_digits_h5, out, "--resume")
    assert code == 0, events[-1]
    scalars, _ = read_zip(out / TENSORBOARD_ZIP, tmp_path / "resumed")
    assert steps(scalars, "epoch/loss") == [1, 2, 3, 4]
    assert steps(scalars, "gradients/first_last_ratio") == [0, 1, 2, 3, 4]
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # one file per attempt


def test_truncate_events_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    """Under a second: what a resume does to events an attempt wrote past its last checkpoint."""
    from tensorboardX import SummaryWriter

    from worker.trainer.tensorboard import truncate_events

    writer = SummaryWriter(str(tmp_path))
    for step in range(6):
        writer.add_scalar("epoch/loss", 1.0 / (step + 1), step)
    writer.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    with event_file.open("ab") as fh:
        fh.write(b"\x10\x00\x00")  # a record torn by a kill

    assert truncate_events(tmp_path, 3) == 2
    scalars = SummaryReader(str(tmp_path)).scalars
    assert steps(scalars, "epoch/loss") == [0, 1, 2, 3]
