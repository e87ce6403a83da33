"""The trainer's command line as the processes around it build it: spelled once, beside its contract.

``python -m worker.trainer`` trains one job in one process (its parser: ``worker/trainer/cli.py``, which
a test checks against :func:`trainer_argv`); ``python -m worker.trainer.ops`` runs one model operation.
The supervisor, the API's dry run, ``gpuyard smoke`` and ``gpuyard demo`` start it through these
functions, so they live on the ground floor: the API may not import the trainer's package.

The trainer's last event when it fails is :data:`FAILED_EVENT` (``reason``, ``detail``, ``problems``); its
exit codes are in ``core/exitcodes.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

#: The trainer's last event when it fails; the same word as the job state, not the same thing.
FAILED_EVENT = "failed"


def trainer_command() -> list[str]:
    """``python -m worker.trainer`` with this interpreter: the command before the trainer's arguments."""
    return [sys.executable, "-m", "worker.trainer"]


def trainer_argv(
    *,
    spec: Path,
    data: Path,
    out: Path,
    summary: Path | None = None,
    gpu: str | None = None,
    memory_fraction: float | None = None,
    backend: str | None = None,
    resume: bool = False,
    dry_run: bool = False,
    command: Sequence[str] | None = None,
) -> list[str]:
    """The trainer's full command line for one job.

    Args:
        spec: the job spec (JSON). data: the HDF5 data set. out: the output directory.
        summary: the data set's stored summary (trusted once the file's sha256 matches it).
        gpu: a GPU UUID, ``cpu`` or ``any`` (overrides the spec's ``resources.gpu``).
        memory_fraction: overrides the spec's. backend: the Keras backend (overrides the spec's).
        resume: continue from ``out/checkpoint``. dry_run: check, build and report, no training.
        command: what runs the trainer (a substitute in tests, ``GPUYARD_TRAINER_COMMAND``); default
            :func:`trainer_command`.

    Returns:
        ``command`` followed by the arguments; ``argv[len(command):]`` is what a warm trainer is handed.
    """
    argv = [*(command if command is not None else trainer_command())]
    if dry_run:
        argv.append("--dry-run")
    argv += ["--spec", str(spec), "--data", str(data)]
    if summary is not None:
        argv += ["--summary", str(summary)]
    argv += ["--out", str(out)]
    if gpu is not None:
        argv += ["--gpu", gpu]
    if memory_fraction is not None:
        argv += ["--memory-fraction", repr(float(memory_fraction))]
    if backend is not None:
        argv += ["--backend", backend]
    if resume:
        argv.append("--resume")
    return argv


def warm_trainer_argv(command: Sequence[str], *, backend: str, gpu: str) -> list[str]:
    """A warm trainer: the framework imported ahead, waiting on stdin for a job's arguments."""
    return [*command, "--warm", "--backend", backend, "--gpu", gpu]


def ops_argv(request: Path) -> list[str]:
    """``python -m worker.trainer.ops --request REQUEST.json``: one model operation."""
    return [sys.executable, "-m", "worker.trainer.ops", "--request", str(request)]
