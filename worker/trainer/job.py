"""The trainer's input bundle: everything ``run.train`` needs, gathered before any framework is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from models.data.summary import DatasetSummary
from models.spec import JobSpec
from worker.trainer.env import EnvPlan, StopFlag
from worker.trainer.events import EventEmitter


@dataclass
class TrainingJob:
    """One job as the trainer process runs it (not the job DB's row, ``store.Job``).

    Attributes:
        spec: the validated job spec, with the command line's resource overrides applied.
        summary: the data set's checked summary (stored at upload and sha256-verified, or checked here).
        data_path: the HDF5 file.
        out_dir: where artifacts and the checkpoint go.
        resume: continue from ``out_dir``'s checkpoint when there is one.
        env: the device, backend and memory cap set up for this process.
        settings: the process's settings.
        emitter: the JSON-lines event stream (the process's real stdout).
        stop: set by SIGTERM/SIGINT or the runtime limit; polled by the training loop.
        started: monotonic time the process started.
    """

    spec: JobSpec
    summary: DatasetSummary
    data_path: Path
    out_dir: Path
    resume: bool
    env: EnvPlan
    settings: Settings
    emitter: EventEmitter
    stop: StopFlag
    started: float
