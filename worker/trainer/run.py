"""Training one job: data, model (or checkpoint), ``fit`` with events, diagnostics and checkpoints, artifacts.

Imported by the CLI only after ``worker.trainer.env`` has set the device, backend and memory cap.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from typing import Any

import h5py
import keras
import numpy as np

from core import names
from core.atomicio import atomic_path, atomic_write_json
from core.errors import Problem, SpecError
from core.exitcodes import ExitCode
from models.build import allow_deep_graphs, build_model, layer_blocks, needs_input_stats
from models.data.reader import open_training_data
from models.health import thresholds_from
from worker.trainer import callbacks as cbs
from worker.trainer.diagnostics import Diagnostics
from worker.trainer.env import TrainingStopped
from worker.trainer.events import jsonable
from worker.trainer.feed import fit_input, input_path
from worker.trainer.job import TrainingJob
from worker.trainer.modelops import evaluate_split, export_model
from worker.trainer.tensorboard import TensorBoardLogger


def train(job: TrainingJob) -> int:
    """Train ``job`` to the end and write its artifacts; return the exit code (0).

    Raises:
        TrainingStopped: cancelled or out of time, after the checkpoint was written.
        SpecError: ``--resume`` against a checkpoint of another spec or data set.
    """
    spec, settings = job.spec, job.settings
    training = spec.training
    timings: dict[str, float] = {"setup_s": time.monotonic() - job.started}
    job.out_dir.mkdir(parents=True, exist_ok=True)
    store = cbs.CheckpointStore(
        job.out_dir / names.CHECKPOINT_DIR,
        # Exports do not change training: a checkpoint stays valid whatever output.export asks for (and
        # across the upgrade that added the field).
        fingerprint=cbs.spec_sha256(spec.model_dump(mode="json", exclude={"output": {"export"}}), job.summary.sha256),
        emitter=job.emitter,
    )
    state = _resume_state(store) if job.resume else None
    if state is None:
        store.clear()

    keras.utils.set_random_seed(training.seed)
    data = open_training_data(
        job.data_path,
        job.summary,
        batch_size=training.batch_size,
        seed=training.seed,
        shuffle=training.shuffle,
        validation_split=training.validation_split,
        in_memory_limit_bytes=settings.in_memory_limit_bytes,
    )
    try:
        return _train(job, data, store, state, timings)
    finally:
        data.close()


def _resume_state(store: cbs.CheckpointStore) -> dict[str, Any] | None:
    state = store.load_state()
    if state is None:
        print("gpuyard trainer: --resume without a checkpoint: starting from scratch", file=sys.stderr)
        return None
    if state.get("fingerprint") != store.fingerprint:
        raise SpecError(
            [
                Problem(
                    "checkpoint_mismatch",
                    "The checkpoint was written for another spec or data set; refusing --resume. "
                    f"Checkpoint fingerprint {state.get('fingerprint')}, this job {store.fingerprint}",
                    "resume",
                )
            ]
        )
    return state


def _train(job: TrainingJob, data: Any, store: cbs.CheckpointStore, state: dict[str, Any] | None, timings: dict) -> int:
    spec, settings, emitter, stop = job.spec, job.settings, job.emitter, job.stop
    training = spec.training
    model, history, records, initial_epoch = _model_and_history(job, data, store, state)
    blocks = _blocks(model)
    probe_x, probe_y = data.probe(settings.probe_batch_size)
    diagnostics = Diagnostics(model, blocks, probe_x, probe_y)
    steps = len(data.train)
    train_rows = int(data.rows["train"])
    _emit_started(job, data, model, state, initial_epoch)
    health = cbs.HealthMonitor(
        emitter,
        records,
        family=spec.architecture.family,
        thresholds=thresholds_from(settings),
        stop_on=list(training.stop_on),
    )
    if state is None:
        records.append(jsonable(diagnostics.record(0)))
        cbs.emit_diagnostics(emitter, records[-1])
    elif records:
        health.resume(records[-1])
    timings["ready_s"] = time.monotonic() - job.started

    early_stopping = _early_stopping(spec)
    if early_stopping is not None and state is not None and state.get("early_stopping"):
        early_stopping.set_state(state["early_stopping"], store.load_best_weights(state))
    stopped_early = bool(state and (state.get("early_stopping") or {}).get("stopped"))

    monitor = cbs.BatchMonitor(
        emitter, stop, epochs=training.epochs, steps=steps, rows=train_rows, batch_size=training.batch_size
    )
    progress = cbs.EpochProgress(emitter, epochs=training.epochs, steps=steps, rows=train_rows, monitor=monitor)
    writer = cbs.CheckpointWriter(
        store,
        history=history,
        diagnostics=records,
        early_stopping=early_stopping,
        stop=stop,
        interval_s=settings.checkpoint_seconds,
        initial_epoch=initial_epoch,
    )
    if state is not None:
        writer.last_epoch = initial_epoch  # the checkpoint resumed from stands until a batch runs
    callbacks: list[keras.callbacks.Callback] = [
        cbs.EpochSetter(data.train),
        monitor,
        progress,
        cbs.HistoryRecorder(history),
    ]
    if early_stopping is not None:
        callbacks.append(early_stopping)
    recorder = cbs.DiagnosticsRecorder(diagnostics, records, emitter, share=settings.diagnostics_share)
    callbacks += [recorder, writer, health]
    board = TensorBoardLogger(
        job.out_dir / names.TENSORBOARD_DIR,
        diagnostics,
        records,
        progress.records,
        epochs=training.epochs,
        histogram_every=settings.tensorboard_histogram_every,
        resumed_from=initial_epoch if state is not None else None,
    )
    callbacks.insert(callbacks.index(writer), board)  # reads the epoch's diagnostics record; before the checkpoint

    fit_started = time.monotonic()
    try:
        if state is None:
            board.log_initial()
            health.check(records[-1], 0)  # before the first step: what the initialisation alone shows
        stop.check()
        if initial_epoch < training.epochs and not stopped_early:
            model.fit(
                fit_input(data.train),
                validation_data=data.validation,
                epochs=training.epochs,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                shuffle=False,  # the reader orders the batches, as a function of (seed, epoch)
                verbose=0,
            )
    except TrainingStopped as stopped:
        _checkpoint_on_stop(stopped, model, writer, monitor, fresh=state is None, store=store)
        raise
    finally:  # every attempt leaves its logs: finished, stopped, or failed (out of memory, a crash)
        board.close(job.out_dir / names.TENSORBOARD_ZIP)
    timings["fit_s"] = time.monotonic() - fit_started
    if stopped_early and early_stopping is not None and early_stopping.restore_best_weights:
        # Resumed after early stopping had already ended training: fit did not run, restore here.
        best = store.load_best_weights(state or {})
        if best is not None:
            model.set_weights(best)
    ended_early = bool(early_stopping is not None and early_stopping.stopped_epoch > 0) or stopped_early
    _finish(job, data, model, history, records, timings, progress.records, stopped_early=ended_early)
    return int(ExitCode.SUCCEEDED)


def _model_and_history(
    job: TrainingJob, data: Any, store: cbs.CheckpointStore, state: dict[str, Any] | None
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], int]:
    """The model, its history, diagnostics records and first epoch: fresh, or as the checkpoint left them."""
    if state is None:
        return build_model(job.spec, job.summary, input_stats=_input_stats(job.spec, data)), [], [], 0
    allow_deep_graphs()
    model = keras.models.load_model(store.directory / state["model"], compile=True)
    cbs.restore_seed_states(model, state["seed_states"])
    return model, list(state["history"]), list(state["diagnostics"]), int(state["epoch"])


def _emit_started(job: TrainingJob, data: Any, model: Any, state: dict[str, Any] | None, initial_epoch: int) -> None:
    """The ``started`` event: what runs, where, on which data, resumed from which epoch."""
    spec, training = job.spec, job.spec.training
    job.emitter.emit(
        "started",
        name=spec.name,
        family=spec.architecture.family,
        backend=keras.backend.backend(),
        device=_device_description(job.env.device),
        memory_cap=job.env.memory_cap,
        env=job.env.to_dict(),
        rows=data.rows,
        train_rows=int(data.rows["train"]),
        input=input_path(data.train),
        steps=len(data.train),
        epochs=training.epochs,
        batch_size=training.batch_size,
        parameters=model.count_params(),
        resumed_from_epoch=initial_epoch if state is not None else None,
        pid=os.getpid(),
    )


def _checkpoint_on_stop(
    stopped: TrainingStopped,
    model: Any,
    writer: cbs.CheckpointWriter,
    monitor: cbs.BatchMonitor,
    *,
    fresh: bool,
    store: cbs.CheckpointStore,
) -> None:
    """Write the checkpoint a stop needs and name it in the stop's detail."""
    # Checkpoints are written by elapsed time: the stop writes the one it needs (the last completed
    # epoch, or the weights reached in the interrupted epoch, marked partial).
    writer.set_model(model)
    # A fresh run stopped before it completed an epoch keeps what it has, marked partial, as before.
    in_epoch = monitor.in_epoch or (fresh and writer.completed_epoch == 0)
    writer.save_on_stop(in_epoch=in_epoch)
    partial = " (partial: the interrupted epoch restarts from it)" if in_epoch else ""
    stopped.detail += f"; checkpoint at epoch {writer.last_epoch}{partial} in {store.directory}"


def _finish(
    job: TrainingJob,
    data: Any,
    model: Any,
    history: list[dict[str, Any]],
    records: list[dict[str, Any]],
    timings: dict,
    epoch_records: Any,
    *,
    stopped_early: bool,
) -> None:
    """Evaluate, write the artifacts and emit ``finished``."""
    final = {
        "train": _last(history, val=False),
        "val": _last(history, val=True),
        "test": evaluate_split(model, data.test, job.spec.training.batch_size),
    }
    artifacts = _write_artifacts(job, model, history, records, final, timings, epoch_records)
    job.emitter.emit(
        "finished",
        epochs_completed=history[-1]["epoch"] if history else 0,
        stopped_early=stopped_early,
        metrics=final,
        artifacts=artifacts,
        wall_s=round(time.monotonic() - job.started, 3),
    )


def _input_stats(spec: Any, data: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The training inputs' (mean, variance) along the last axis when the model standardizes, else None.

    The reader gives per-element statistics (shape of one sample, e.g. 8×8×1); the Normalization layer
    takes one pair per feature of the last axis (channels of an image), as ``compute_input_stats`` does.
    The total variance per channel is the mean of the element variances plus the variance of the element
    means. Constant features get variance 1 (as in ``compute_input_stats``), so they map to 0.
    """
    if not needs_input_stats(spec):
        return None
    mean, variance = (np.asarray(a, dtype=np.float64) for a in data.input_stats())
    if mean.ndim > 1:
        axes = tuple(range(mean.ndim - 1))
        channel_mean = mean.mean(axis=axes)
        variance = (variance + (mean - channel_mean) ** 2).mean(axis=axes)
        mean = channel_mean
    variance = np.where(variance <= 1e-12, 1.0, variance)
    return mean.astype(np.float32), variance.astype(np.float32)


def _blocks(model: keras.Model) -> dict[str, list[str]]:
    try:
        return {str(k): list(v) for k, v in layer_blocks(model).items()}
    except (KeyError, ValueError, AttributeError, TypeError) as exc:
        print(f"gpuyard trainer: no block table ({exc}); diagnostics per layer", file=sys.stderr)
        return {}


def _early_stopping(spec: Any) -> cbs.ResumableEarlyStopping | None:
    config = spec.training.early_stopping
    if config is None:
        return None
    return cbs.ResumableEarlyStopping(
        monitor=config.monitor,
        patience=config.patience,
        min_delta=config.min_delta,
        restore_best_weights=config.restore_best_weights,
    )


def _last(history: list[dict[str, Any]], *, val: bool) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    if val:
        return {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
    return {k: v for k, v in last.items() if k != "epoch" and not k.startswith("val_")}


def _write_artifacts(
    job: TrainingJob,
    model: keras.Model,
    history: list[dict[str, Any]],
    records: list[dict[str, Any]],
    final: dict[str, Any],
    timings: dict[str, float],
    epoch_records: list[dict[str, Any]],
) -> dict[str, str]:
    out = job.out_dir
    save_started = time.monotonic()
    # atomic_path keeps the target's suffix on its temporary name, so Keras picks the format from it.
    with atomic_path(out / names.MODEL_H5) as tmp:
        model.save(tmp)
    with atomic_path(out / names.MODEL_KERAS) as tmp:
        model.save(tmp)
    atomic_write_json(out / names.HISTORY, _history_columns(history))
    atomic_write_json(out / names.DIAGNOSTICS, records)
    timings["save_s"] = time.monotonic() - save_started
    exports = _exports(model, out, job.spec.output.export)
    timings["total_s"] = time.monotonic() - job.started
    summary = {
        "spec": job.spec.model_dump(mode="json"),
        "dataset": job.summary.model_dump(mode="json"),
        "parameters": model.count_params(),
        "env": job.env.to_dict(),
        "metrics": final,
        "epochs": epoch_records,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "versions": _versions(),
    }
    if exports:
        summary["exports"] = exports
    atomic_write_json(out / names.SUMMARY, jsonable(summary))
    return {name: str(out / name) for name in (*names.ARTIFACT_NAMES, names.CHECKPOINT_DIR) if (out / name).exists()}


def _exports(model: keras.Model, out: Any, formats: list[str]) -> dict[str, Any]:
    """The exports the spec asks for (``output.export``). A failed export does not fail the trained job: it
    is reported in summary.json (and the traceback in trainer.log); ``gpuyard export`` can retry it."""
    report: dict[str, Any] = {}
    for fmt in formats:
        try:
            export_model(model, out, [fmt])
            report[fmt] = {"ok": True, "artifact": names.EXPORT_ARTIFACTS[fmt]}
        except Exception as exc:  # tf2onnx and SavedModel tracing raise anything; the model is saved already
            traceback.print_exception(exc, file=sys.stderr)
            report[fmt] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:2000]}
    return report


def _history_columns(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keras' ``History.history`` layout (metric → one value per epoch), with the epoch numbers."""
    columns: dict[str, list[Any]] = {"epoch": []}
    for row in history:
        for key in row:
            columns.setdefault(key, [])
    for row in history:
        for key, values in columns.items():
            values.append(row.get(key))
    return columns


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "backend": keras.backend.backend(),
    }
    framework = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[keras.backend.backend()]
    module = sys.modules.get(framework)
    if module is not None:
        versions[framework] = getattr(module, "__version__", "unknown")
    try:
        from importlib.metadata import version  # only when writing the summary

        versions["gpuyard"] = version("gpuyard")
    except Exception:
        versions["gpuyard"] = "source"
    return versions


def _device_description(device: str) -> str:
    try:
        names = keras.distribution.list_devices()
    except Exception:
        names = []
    return f"{device} ({', '.join(names)})" if names else device
