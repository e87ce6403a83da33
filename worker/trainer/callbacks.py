"""Keras callbacks of the trainer: progress events, stop checks, diagnostics, history and checkpoints.

Only ``BatchMonitor`` runs per batch; it declares ``async_safe`` so that on JAX and torch Keras keeps
dispatching steps asynchronously (a per-batch hook that is not async-safe forces a device sync every step).
Every other callback works at epoch boundaries.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core.atomicio import atomic_path, atomic_write_json
from core.exitcodes import ExitCode
from core.names import CHECKPOINT_STATE
from models.health import HealthThresholds, HealthWatch, health_events
from worker.trainer.diagnostics import Diagnostics
from worker.trainer.env import StopFlag, TrainingStopped
from worker.trainer.events import EventEmitter, jsonable

SEED_STATE_NAME = "seed_generator_state"


def spec_sha256(spec_dump: dict[str, Any], data_sha256: str) -> str:
    """Fingerprint of what a checkpoint was trained on: the spec (resources left out) and the data."""
    payload = {k: v for k, v in spec_dump.items() if k != "resources"}
    text = json.dumps({"spec": payload, "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def seed_states(model: keras.Model) -> list[list[int]]:
    """States of the model's random seed generators (dropout), in the model's order.

    Keras does not save them with the model; without them a resumed run draws other dropout masks.
    """
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value)).astype(np.int64).tolist()
        for v in model.variables
        if v.name == SEED_STATE_NAME
    ]


def restore_seed_states(model: keras.Model, states: list[list[int]]) -> None:
    variables = [v for v in model.variables if v.name == SEED_STATE_NAME]
    if len(variables) != len(states):
        raise ValueError(f"Expected {len(variables)} seed generator states for this model. Received: {len(states)}")
    for variable, state in zip(variables, states, strict=True):
        variable.assign(np.asarray(state, dtype=keras.backend.standardize_dtype(variable.dtype)))


class BatchMonitor(keras.callbacks.Callback):
    """After every batch: stop when asked (signal, time limit), and emit a rate-limited ``batch`` event."""

    async_safe = True

    def __init__(
        self,
        emitter: EventEmitter,
        stop: StopFlag,
        *,
        epochs: int,
        steps: int,
        rows: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.emitter = emitter
        self.stop = stop
        self.epochs = epochs
        self.steps = steps
        self.rows = rows
        self.batch_size = batch_size
        self.epoch = 0
        self.epoch_started = time.monotonic()
        self.last_batch_end: float | None = None
        self.epoch_seconds: list[float] = []
        #: Whether training batches ran since the last completed epoch (a stop now leaves a partial epoch).
        self.in_epoch = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.epoch_started = time.monotonic()
        self.last_batch_end = None
        self.stop.check()

    def train_seconds(self) -> float | None:
        """Seconds from this epoch's start to the end of its last training batch."""
        if self.last_batch_end is None:
            return None
        return self.last_batch_end - self.epoch_started

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Per batch only a clock read and two flag tests; the runtime limit is checked with the rate-limited
        # progress event (at most every progress_interval_s), a signal at once.
        self.last_batch_end = time.monotonic()
        self.in_epoch = True
        if self.stop.requested:
            self.stop.check()
        if not self.emitter.batch_due():
            return
        self.stop.check()
        elapsed = max(time.monotonic() - self.epoch_started, 1e-9)
        done = batch + 1
        samples = min(done * self.batch_size, self.rows)
        epoch_estimate = float(np.mean(self.epoch_seconds)) if self.epoch_seconds else elapsed * self.steps / done
        eta = elapsed / done * (self.steps - done) + epoch_estimate * (self.epochs - self.epoch - 1)
        self.emitter.batch(
            epoch=self.epoch + 1,
            step=done,
            steps=self.steps,
            loss=(logs or {}).get("loss"),
            samples_per_s=samples / elapsed,
            eta_s=round(eta, 2),
        )

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.stop.requested:
            self.stop.check()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.in_epoch = False


class EpochProgress(keras.callbacks.Callback):
    """``epoch_start`` / ``epoch_end`` events, with training throughput and the ETA."""

    def __init__(self, emitter: EventEmitter, *, epochs: int, steps: int, rows: int, monitor: BatchMonitor) -> None:
        super().__init__()
        self.emitter = emitter
        self.epochs = epochs
        self.steps = steps
        self.rows = rows
        self.monitor = monitor
        self.started = 0.0
        self.records: list[dict[str, Any]] = []

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.monotonic()
        self.emitter.emit("epoch_start", epoch=epoch + 1, epochs=self.epochs, steps=self.steps)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        duration = time.monotonic() - self.started
        # Throughput counts the training steps only (validation and diagnostics come after them).
        train_seconds = self.monitor.train_seconds() or duration
        self.monitor.epoch_seconds.append(duration)
        eta = float(np.mean(self.monitor.epoch_seconds)) * (self.epochs - epoch - 1)
        record = {
            "epoch": epoch + 1,
            "epochs": self.epochs,
            "loss": logs.pop("loss", None),
            "metrics": logs,
            "samples_per_s": self.rows / train_seconds if train_seconds > 0 else None,
            "train_s": round(train_seconds, 4),
            "duration_s": round(duration, 4),
            "eta_s": round(eta, 2),
        }
        self.records.append(record)
        self.emitter.emit("epoch_end", **record)


class EpochSetter(keras.callbacks.Callback):
    """Tells the training PyDataset which epoch starts, so its shuffle is a function of (seed, epoch)."""

    def __init__(self, dataset: Any) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


class HistoryRecorder(keras.callbacks.Callback):
    """Per-epoch logs across a resume (Keras' own History restarts with every ``fit``)."""

    def __init__(self, history: list[dict[str, Any]]) -> None:
        super().__init__()
        self.history = history

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.history.append({"epoch": epoch + 1, **jsonable(dict(logs or {}))})


class DiagnosticsRecorder(keras.callbacks.Callback):
    """Appends a diagnostics record after sampled epochs, and emits its per-block part as an event.

    The probe pass is sampled so that it takes at most ``share`` of the training time: after a probe that
    took ``d`` seconds, the next runs after the first epoch that ends ``d / share`` seconds (of training
    since that probe) later. It always runs after the first and the last epoch, after an epoch whose loss
    is not finite, and when training stops early; ``share=1`` probes after every epoch. Records keep their
    shape; their ``epoch`` says which epoch each describes (the health rules read the latest one).

    Args:
        diagnostics: the probe.
        records: the list the records are appended to (shared with the health monitor and checkpoints).
        emitter: where ``diagnostics`` events go.
        share: the share of training time the probe may take, in (0, 1].
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        diagnostics: Diagnostics,
        records: list[dict[str, Any]],
        emitter: EventEmitter | None = None,
        *,
        share: float = 1.0,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__()
        if not 0 < share <= 1:
            raise ValueError(f"Expected a share in (0, 1]. Received: share={share}")
        self.diagnostics = diagnostics
        self.records = records
        self.emitter = emitter
        self.share = share
        self.clock = clock
        self.last_probe_end: float | None = None
        self.last_probe_s = 0.0
        self.first_epoch: int | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.last_probe_end = self.clock()

    def due(self, epoch: int, logs: dict[str, Any] | None) -> bool:
        """Whether the probe runs after epoch ``epoch`` (0-based, as Keras counts)."""
        if self.share >= 1 or self.last_probe_end is None:
            return True
        if self.first_epoch is None or epoch == self.first_epoch:
            return True
        # ``_model``: on JAX the ``model`` property syncs the state to the model, not needed for a flag.
        last = epoch + 1 >= int((self.params or {}).get("epochs") or 0)
        if last or bool(getattr(self._model, "stop_training", False)):
            return True
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            return True
        return self.clock() - self.last_probe_end >= self.last_probe_s / self.share

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
        if not self.due(epoch, logs):
            return
        started = self.clock()
        record = jsonable(self.diagnostics.record(epoch + 1))
        self.last_probe_end = self.clock()
        self.last_probe_s = self.last_probe_end - started
        self.records.append(record)
        if self.emitter is not None:
            emit_diagnostics(self.emitter, record)


def emit_diagnostics(emitter: EventEmitter, record: dict[str, Any]) -> None:
    """A ``diagnostics`` event: the epoch's per-block gradient norm and activation mean/std (what the
    dashboard's gradient-flow view draws while the job trains); per-layer norms stay in diagnostics.json."""
    emitter.emit("diagnostics", epoch=record["epoch"], probe_loss=record.get("probe_loss"), blocks=record["blocks"])


class HealthMonitor(keras.callbacks.Callback):
    """Reads each diagnostics record with the health rules; emits ``health`` when the findings change.

    Runs after the checkpoint writer, so a job stopped on a finding (``training.stop_on``) keeps that epoch.

    Args:
        emitter: where ``health`` events go.
        records: the diagnostics records, the latest last (the recorder appends to the same list).
        family: the spec's architecture family.
        thresholds: the rules' thresholds (settings ``GPUYARD_HEALTH_*``).
        stop_on: finding kinds that end the job (``TrainingStopped`` with exit code ``unhealthy``).
    """

    def __init__(
        self,
        emitter: EventEmitter,
        records: list[dict[str, Any]],
        *,
        family: str,
        thresholds: HealthThresholds,
        stop_on: list[str],
    ) -> None:
        super().__init__()
        self.emitter = emitter
        self.records = records
        self.family = family
        self.thresholds = thresholds
        self.stop_on = set(stop_on)
        self.watch = HealthWatch()

    def findings(self, record: dict[str, Any], epoch: int, train_loss: Any = None) -> list[dict[str, Any]]:
        return health_events(record, family=self.family, thresholds=self.thresholds, epoch=epoch, train_loss=train_loss)

    def resume(self, record: dict[str, Any]) -> None:
        """Restate a resumed run's current findings once: the new attempt's job record starts without them."""
        epoch = int(record.get("epoch", 0))
        findings = self.findings(record, epoch)
        if self.watch.update(findings):
            self.emitter.emit("health", epoch=epoch, findings=findings, resumed=True)

    def check(self, record: dict[str, Any], epoch: int, train_loss: Any = None) -> list[dict[str, Any]]:
        """Emit this epoch's findings when they are news; raise when one is in ``stop_on``."""
        findings = self.findings(record, epoch, train_loss)
        if self.watch.update(findings):
            self.emitter.emit("health", epoch=epoch, findings=findings)
        stopping = [f for f in findings if f["kind"] in self.stop_on]
        if stopping:
            kinds = ", ".join(f["kind"] for f in stopping)
            raise TrainingStopped(
                ExitCode.UNHEALTHY,
                f"stopped at epoch {epoch} on {kinds} (training.stop_on): {stopping[0]['detail']} "
                f"Remedy: {stopping[0]['remedy']}",
            )
        return findings

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Only a record of this epoch is news (the probe is sampled, see DiagnosticsRecorder); an epoch
        # whose loss is not finite always gets one.
        if self.records and self.records[-1].get("epoch") == epoch + 1:
            self.check(self.records[-1], epoch + 1, (logs or {}).get("loss"))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` whose counters survive a resume (``get_state``/``set_state``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored: dict[str, Any] | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self._restored is not None:
            state = self._restored
            self.wait = int(state["wait"])
            self.stopped_epoch = int(state["stopped_epoch"])
            if state.get("best") is not None:
                self.best = float(state["best"])
            self.best_epoch = int(state.get("best_epoch", 0))
            self.best_weights = state.get("best_weights")

    def get_state(self) -> dict[str, Any]:
        best = float(self.best) if self.best is not None and np.isfinite(self.best) else None
        return {
            "wait": int(self.wait),
            "stopped_epoch": int(self.stopped_epoch),
            "best": best,
            "best_epoch": int(getattr(self, "best_epoch", 0)),
            "stopped": bool(self.model is not None and self.model.stop_training),
        }

    def set_state(self, state: dict[str, Any], best_weights: list[np.ndarray] | None = None) -> None:
        self._restored = {**state, "best_weights": best_weights}


class CheckpointStore:
    """``checkpoint/``: a model file per completed epoch and ``state.json`` naming it, written last.

    A crash between the two writes leaves the previous ``state.json`` naming the previous model file,
    which is deleted only after the new state is in place: the pair on disk is always consistent.
    """

    def __init__(self, directory: Path, *, fingerprint: str, emitter: EventEmitter | None = None) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.emitter = emitter

    @property
    def state_path(self) -> Path:
        return self.directory / CHECKPOINT_STATE

    def load_state(self) -> dict[str, Any] | None:
        """The last consistent state, or None when no checkpoint was written."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        if not (self.directory / state["model"]).is_file():
            raise FileNotFoundError(f"checkpoint state names {state['model']}, which is missing")
        return state

    def clear(self) -> None:
        """Remove a previous job's checkpoint (a fresh start must not resume from it later)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.is_file() and (path.name == CHECKPOINT_STATE or path.name.startswith(("model-", "best-", "."))):
                path.unlink()

    def save(
        self,
        model: keras.Model,
        *,
        epoch: int,
        history: list[dict[str, Any]],
        diagnostics: list[dict[str, Any]],
        early_stopping: ResumableEarlyStopping | None,
        partial_epoch: bool = False,
    ) -> dict[str, Any]:
        """Write the model (with optimizer state), then the state naming it; drop the older files."""
        stem = f"model-{epoch:04d}{'-partial' if partial_epoch else ''}"
        model_name = f"{stem}.keras"
        started = time.monotonic()
        with atomic_path(self.directory / model_name) as tmp:
            model.save(tmp)
        best_name = None
        stopping_state = None
        if early_stopping is not None:
            stopping_state = early_stopping.get_state()
            if early_stopping.best_weights is not None:
                best_name = f"best-{epoch:04d}.npz"
                with atomic_path(self.directory / best_name) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, *[np.asarray(w) for w in early_stopping.best_weights])
        state = {
            "epoch": epoch,
            "partial_epoch": partial_epoch,
            "model": model_name,
            "best_weights": best_name,
            "fingerprint": self.fingerprint,
            "seed_states": seed_states(model),
            "early_stopping": stopping_state,
            "history": history,
            "diagnostics": diagnostics,
            "written_at": time.time(),
        }
        atomic_write_json(self.state_path, state)
        keep = {CHECKPOINT_STATE, model_name, best_name}
        for path in self.directory.iterdir():
            if path.name.startswith(("model-", "best-")) and path.name not in keep:
                path.unlink(missing_ok=True)
        if self.emitter is not None:
            self.emitter.emit(
                "checkpoint",
                epoch=epoch,
                partial_epoch=partial_epoch,
                path=str(self.directory / model_name),
                duration_s=round(time.monotonic() - started, 4),
            )
        return state

    def load_best_weights(self, state: dict[str, Any]) -> list[np.ndarray] | None:
        if not state.get("best_weights"):
            return None
        with np.load(self.directory / state["best_weights"]) as archive:
            return [archive[f"arr_{i}"] for i in range(len(archive.files))]


class CheckpointWriter(keras.callbacks.Callback):
    """Writes the checkpoint at an epoch's end, by elapsed time, after history, early stopping and diagnostics.

    A checkpoint is written after an epoch when ``interval_s`` seconds passed since the last one (and at
    least 100 times the last save's duration, so saving takes at most 1 % of the time), after the last
    epoch, when training stops early, and when a stop (signal, time limit) is pending. ``interval_s=0``
    writes one after every epoch. ``save_on_stop`` writes the one a stop in the middle of an epoch needs.

    Args:
        interval_s: minimum seconds between two checkpoints (0: every epoch).
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        history: list[dict[str, Any]],
        diagnostics: list[dict[str, Any]],
        early_stopping: ResumableEarlyStopping | None,
        stop: StopFlag,
        interval_s: float = 0.0,
        initial_epoch: int = 0,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"Expected interval_s >= 0. Received: interval_s={interval_s}")
        self.store = store
        self.history = history
        self.diagnostics = diagnostics
        self.early_stopping = early_stopping
        self.stop = stop
        self.interval_s = interval_s
        self.clock = clock
        self.last_epoch: int | None = None
        self.completed_epoch = initial_epoch
        self.last_save_at = clock()
        self.last_save_s = 0.0

    def due(self, epoch: int) -> bool:
        """Whether the checkpoint is written after epoch ``epoch`` (0-based)."""
        if self.interval_s == 0 or self.stop.stop_reason() is not None:
            return True
        # ``_model``: on JAX the ``model`` property syncs the state to the model, not needed for a flag.
        last = epoch + 1 >= int((self.params or {}).get("epochs") or 0)
        if last or bool(getattr(self._model, "stop_training", False)):
            return True
        return self.clock() - self.last_save_at >= max(self.interval_s, 100 * self.last_save_s)

    def save(self, epoch: int, *, partial_epoch: bool = False) -> None:
        started = self.clock()
        self.store.save(
            self.model,
            epoch=epoch,
            history=self.history,
            diagnostics=self.diagnostics,
            early_stopping=self.early_stopping,
            partial_epoch=partial_epoch,
        )
        self.last_save_at = self.clock()
        self.last_save_s = self.last_save_at - started
        self.last_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.completed_epoch = epoch + 1
        if self.due(epoch):
            self.save(epoch + 1)
        # A signal that arrived during validation or the save stops here, on a clean checkpoint.
        self.stop.check()

    def save_on_stop(self, *, in_epoch: bool) -> None:
        """The checkpoint a stop leaves, unless the last completed epoch has one (then a resume is exact and
        only the interrupted epoch's batches are lost): that epoch's, between epochs; in the middle of an
        epoch, the weights reached so far (``partial_epoch``: a resume re-runs that epoch from them)."""
        if self.last_epoch != self.completed_epoch:
            self.save(self.completed_epoch, partial_epoch=in_epoch)
