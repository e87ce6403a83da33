"""Checkpoints by elapsed time and sampled diagnostics: when each is written, and what a stop leaves.

The policy tests drive the callbacks with a fake clock (no training, well under a second once Keras is
imported); the last test trains the digits job with the defaults (about 15 s on the 2-core box).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import keras
import pytest
from trainer_helpers import ROOT, parse_events, trainer_command, trainer_env, write_spec

from worker.trainer import callbacks as cbs
from worker.trainer.env import StopFlag


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Store:
    """Records what the writer saves instead of saving a model."""

    def __init__(self, clock: Clock, save_s: float = 0.0) -> None:
        self.saved: list[tuple[int, bool]] = []
        self.clock = clock
        self.save_s = save_s

    def save(self, model: Any, *, epoch: int, partial_epoch: bool = False, **_: Any) -> None:
        self.clock.now += self.save_s
        self.saved.append((epoch, partial_epoch))


class Model:
    stop_training = False


def writer(clock: Clock, interval_s: float, *, epochs: int = 100, save_s: float = 0.0, stop: StopFlag | None = None):
    store = Store(clock, save_s)
    callback = cbs.CheckpointWriter(
        store,  # type: ignore[arg-type]
        history=[],
        diagnostics=[],
        early_stopping=None,
        stop=stop or StopFlag(clock=clock),
        interval_s=interval_s,
        clock=clock,
    )
    callback.set_params({"epochs": epochs})
    callback.set_model(Model())
    return callback, store


def run_epochs(callback: keras.callbacks.Callback, clock: Clock, epochs: range, epoch_s: float) -> None:
    for epoch in epochs:
        clock.now += epoch_s
        callback.on_epoch_end(epoch, {"loss": 1.0})


def test_checkpoints_come_every_interval_and_after_the_last_epoch() -> None:
    clock = Clock()
    callback, store = writer(clock, 30, epochs=100)
    run_epochs(callback, clock, range(100), 0.2)  # 20 s in all: only the last epoch is saved
    assert store.saved == [(100, False)]

    clock = Clock()
    callback, store = writer(clock, 30, epochs=100)
    run_epochs(callback, clock, range(100), 1.0)
    assert [epoch for epoch, _ in store.saved] == [30, 60, 90, 100]


def test_zero_interval_saves_every_epoch_and_slow_saves_stretch_the_interval() -> None:
    clock = Clock()
    callback, store = writer(clock, 0, epochs=5)
    run_epochs(callback, clock, range(5), 0.1)
    assert [epoch for epoch, _ in store.saved] == [1, 2, 3, 4, 5]

    clock = Clock()
    callback, store = writer(clock, 30, epochs=200, save_s=1.0)  # a 1 s save: at most every 100 s
    run_epochs(callback, clock, range(200), 1.0)
    gaps = [b - a for (a, _), (b, _) in zip(store.saved, store.saved[1:], strict=False)]
    assert store.saved[0][0] == 30 and all(gap >= 99 for gap in gaps[:-1])


def test_a_stop_saves_the_completed_epoch_or_the_partial_one() -> None:
    clock = Clock()
    stop = StopFlag(clock=clock)
    callback, store = writer(clock, 30, epochs=100, stop=stop)
    run_epochs(callback, clock, range(3), 0.2)
    assert store.saved == []
    callback.save_on_stop(in_epoch=False)  # stopped between epochs: the 3rd is complete
    assert store.saved == [(3, False)]
    callback.save_on_stop(in_epoch=True)  # in the 4th: the 3rd's checkpoint stands (an exact resume)
    assert store.saved == [(3, False)]

    run_epochs(callback, clock, range(3, 5), 0.2)
    callback.save_on_stop(in_epoch=True)  # 5 epochs done, the last 2 unsaved: the 6th's weights so far
    assert store.saved[-1] == (5, True)

    stop.request("SIGTERM")  # a signal pending at an epoch's end: saved there, then the stop is raised
    with pytest.raises(Exception, match="SIGTERM"):
        callback.on_epoch_end(5, {})
    assert store.saved[-1] == (6, False)


class Probe:
    def __init__(self, clock: Clock, probe_s: float) -> None:
        self.clock, self.probe_s = clock, probe_s

    def record(self, epoch: int) -> dict[str, Any]:
        self.clock.now += self.probe_s
        return {"epoch": epoch, "blocks": {}}


def recorder(clock: Clock, share: float, probe_s: float, epochs: int) -> tuple[cbs.DiagnosticsRecorder, list]:
    records: list[dict[str, Any]] = []
    callback = cbs.DiagnosticsRecorder(Probe(clock, probe_s), records, share=share, clock=clock)  # type: ignore[arg-type]
    callback.set_params({"epochs": epochs})
    callback.set_model(Model())
    callback.on_train_begin()
    return callback, records


def test_the_probe_takes_at_most_its_share_and_always_runs_first_last_and_on_a_bad_loss() -> None:
    clock = Clock()
    callback, records = recorder(clock, share=0.01, probe_s=0.05, epochs=100)
    for epoch in range(100):
        clock.now += 0.2
        callback.on_epoch_end(epoch, {"loss": float("nan") if epoch == 50 else 1.0})
    probed = [r["epoch"] for r in records]
    assert probed[0] == 1 and probed[-1] == 100 and 51 in probed
    assert len(probed) * 0.05 <= 0.02 * 100 * 0.2 + 2 * 0.05  # about 1 %, plus the always-run ones

    clock = Clock()
    callback, records = recorder(clock, share=1.0, probe_s=0.05, epochs=5)
    for epoch in range(5):
        callback.on_epoch_end(epoch, {"loss": 1.0})
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]


def test_health_reads_only_this_epochs_record() -> None:
    emitted: list[tuple[str, dict[str, Any]]] = []

    class Emitter:
        def emit(self, event: str, **fields: Any) -> None:
            emitted.append((event, fields))

    records: list[dict[str, Any]] = [{"epoch": 1, "blocks": {}, "probe_loss": None}]
    health = cbs.HealthMonitor(Emitter(), records, family="mlp", thresholds=None, stop_on=[])  # type: ignore[arg-type]
    checked: list[int] = []
    health.check = lambda record, epoch, loss=None: checked.append(epoch) or []  # type: ignore[method-assign]
    health.on_epoch_end(0, {})
    health.on_epoch_end(1, {})  # no record of epoch 2: nothing to read
    assert checked == [1]


DEFAULTS = {"GPUYARD_CHECKPOINT_SECONDS": "30", "GPUYARD_DIAGNOSTICS_SHARE": "0.01"}
SPEC = {
    "name": "defaults",
    "architecture": {"family": "mlp", "widths": [32]},
    "training": {"epochs": 12, "batch_size": 64, "seed": 1},
}


def test_a_short_job_with_the_defaults_checkpoints_once_and_a_signal_still_leaves_one(
    tmp_path: Path, small_digits_h5: Path
) -> None:
    spec = write_spec(tmp_path / "spec.json", SPEC)
    done = subprocess.run(
        trainer_command(spec, small_digits_h5, tmp_path / "out"),
        capture_output=True, text=True, cwd=ROOT, env=trainer_env(**DEFAULTS), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    events = parse_events(done.stdout)
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [12]
    probed = [e["epoch"] for e in events if e["event"] == "diagnostics"]
    assert probed[:2] == [0, 1] and probed[-1] == 12 and len(probed) < 13
    diagnostics = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert [r["epoch"] for r in diagnostics] == probed

    long = {**SPEC, "training": {**SPEC["training"], "epochs": 10_000}}
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        trainer_command(write_spec(tmp_path / "long.json", long), small_digits_h5, out),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=trainer_env(**DEFAULTS),
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if json.loads(line)["event"] == "epoch_end" and json.loads(line)["epoch"] == 3:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(60) == 6
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] >= 3 and (out / "checkpoint" / state["model"]).is_file()
    failed = parse_events("".join(lines))[-1]
    assert f"checkpoint at epoch {state['epoch']}" in failed["detail"]
