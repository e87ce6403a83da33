"""Command line of the trainer: parse, check spec and data, set up the process, then train (one job).

Nothing here imports a framework at module level: the device, backend and memory cap are set first
(``worker.trainer.env``), and only then is ``worker.trainer.run`` (which imports Keras) imported.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from core.atomicio import file_sha256
from core.errors import DataError, GpuyardError, Problem, SpecError
from core.exitcodes import ExitCode
from core.settings import Settings, get_settings
from models.data.sandbox import check_file
from models.data.summary import DataKeys, DatasetSummary
from models.spec import JobSpec, parse_spec
from worker.gpus import gpu_total_memory_bytes
from worker.trainer import env
from worker.trainer.events import FAILED_EVENT, WARM_READY_LINE, EventEmitter
from worker.trainer.job import TrainingJob

PROCESS_STARTED = time.monotonic()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.trainer",
        description="Train one gpuyard job. stdout carries JSON-line events only; logs go to stderr.",
    )
    parser.add_argument("--spec", required=True, type=Path, help="job spec, JSON")
    parser.add_argument("--data", required=True, type=Path, help="HDF5 data set")
    parser.add_argument(
        "--summary",
        type=Path,
        help="the data set's stored summary (JSON, from its upload check): trusted once the file's sha256 "
        "matches it, instead of checking the data again",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--gpu", help="GPU UUID, 'cpu' or 'any' (overrides resources.gpu)")
    parser.add_argument("--memory-fraction", type=float, help="share of GPU memory (overrides the spec)")
    parser.add_argument("--backend", choices=env.BACKENDS, help="Keras backend (overrides the spec)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint when present")
    parser.add_argument("--dry-run", action="store_true", help="check spec and data, build, report, no training")
    return parser


def claim_stdout() -> TextIO:
    """Keep the real stdout for events; send everything else printed to fd 1 (C libraries too) to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return io.TextIOWrapper(os.fdopen(events_fd, "wb", buffering=0), encoding="utf-8", write_through=True)


def route_logs_to_stderr() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, force=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")


def load_spec(path: Path, overrides: dict[str, Any]) -> JobSpec:
    """Read and validate the spec, with the command line's resource overrides applied first."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise SpecError([Problem("spec_unreadable", f"Cannot read the spec file {path}: {exc.strerror}")]) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("json_invalid", f"The spec file {path} is not JSON: {exc}")]) from exc
    if isinstance(raw, dict) and overrides:
        resources = raw.get("resources")
        raw["resources"] = {**(resources if isinstance(resources, dict) else {}), **overrides}
    return parse_spec(raw)


def data_summary(data: Path, keys: DataKeys, stored: Path | None) -> DatasetSummary:
    """The data set's summary, read once per job.

    With ``stored`` (the summary its upload's check wrote) for the same keys, the summary is trusted once
    the file's sha256 matches it: the data was checked at upload and is not scanned again. Otherwise (no
    stored summary, an unreadable or older one, other keys) the file is checked in the sandboxed child
    process, as an upload is.

    Raises:
        DataError: the file is refused, or it is not the file the stored summary describes.
    """
    summary = None
    if stored is not None:
        try:
            summary = DatasetSummary.model_validate_json(stored.read_text())
        except (OSError, ValueError) as exc:
            print(f"gpuyard trainer: stored data set summary unusable ({type(exc).__name__}); checking the data",
                  file=sys.stderr)  # fmt: skip
    if summary is None or summary.keys != keys:
        return check_file(data, keys)
    actual = file_sha256(data)
    if actual != summary.sha256:
        detail = (
            f"The data file's sha256 is {actual[:16]}…; expected {summary.sha256[:16]}… as checked at upload. "
            "The stored file changed: upload the data set again"
        )
        raise DataError([Problem("sha256_mismatch", detail)])
    return summary


def classify(exc: BaseException) -> ExitCode:
    """Exit code of an exception escaping training: OOM on any backend, else internal error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, env.TrainingStopped):
            return current.exit_code
        if isinstance(current, SpecError):
            return ExitCode.SPEC_INVALID
        if isinstance(current, DataError):
            return ExitCode.DATASET_INVALID
        if isinstance(current, MemoryError):
            return ExitCode.OUT_OF_MEMORY
        name = type(current).__name__
        # tf.errors.ResourceExhaustedError, torch.cuda.OutOfMemoryError, jax's XlaRuntimeError text.
        if name in ("ResourceExhaustedError", "OutOfMemoryError") or "RESOURCE_EXHAUSTED" in str(current):
            return ExitCode.OUT_OF_MEMORY
        current = current.__cause__ or current.__context__
    return ExitCode.INTERNAL_ERROR


def fail(emitter: EventEmitter, exc: BaseException) -> int:
    """Emit ``failed`` for an exception and return its exit code; tracebacks go to stderr only."""
    code = classify(exc)
    problems: list[dict[str, Any]] = []
    if isinstance(exc, GpuyardError):
        problems = [p.to_dict() for p in exc.problems]
    if code is ExitCode.INTERNAL_ERROR or code is ExitCode.OUT_OF_MEMORY:
        traceback.print_exception(exc, file=sys.stderr)
    detail = exc.detail if isinstance(exc, env.TrainingStopped) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, GpuyardError):
        detail = str(exc)
    emitter.emit(FAILED_EVENT, reason=code.reason, exit_code=int(code), detail=detail[:4000], problems=problems)
    return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--warm"]:
        return warm_main(arguments[1:])
    return run_job(arguments, claim_stdout(), PROCESS_STARTED)


def run_job(argv: Sequence[str], events_stream: TextIO, started: float, *, warm: bool = False) -> int:
    """Train the job ``argv`` describes (the cold command line); events go to ``events_stream``.

    ``warm``: the framework was imported before the job (``warm_main``); ``started`` is when the job came.
    """
    args = build_parser().parse_args(argv)  # usage errors: exit 2 from argparse, message on stderr
    route_logs_to_stderr()
    settings = get_settings()
    emitter = EventEmitter(events_stream, min_batch_interval_s=settings.progress_interval_s)
    stop = env.StopFlag(started=started)
    stop.install()
    try:
        return prepare_and_train(args, settings, emitter, stop, started, warm=warm)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if stop.requested and not isinstance(exc, env.TrainingStopped):
            # A signal to the process group also ends the sandboxed data check; it is a cancel.
            cancelled = env.TrainingStopped(ExitCode.CANCELLED, f"stopped by {stop.signal_name} ({exc})")
            cancelled.__cause__ = exc
            return fail(emitter, cancelled)
        return fail(emitter, exc)
    finally:
        events_stream.flush()
        events_stream.close()


def prepare_and_train(
    args: argparse.Namespace,
    settings: Settings,
    emitter: EventEmitter,
    stop: env.StopFlag,
    started: float,
    *,
    warm: bool = False,
) -> int:
    overrides: dict[str, Any] = {}
    if args.gpu is not None:
        overrides["gpu"] = args.gpu
    if args.memory_fraction is not None:
        overrides["memory_fraction"] = args.memory_fraction
    if args.backend is not None:
        overrides["backend"] = args.backend
    spec = load_spec(args.spec, overrides)
    stop.set_max_runtime(spec.resources.max_runtime_s)

    summary = data_summary(args.data, spec.data, args.summary)
    stop.check()

    device = "cpu" if args.dry_run else spec.resources.gpu
    total = None if device == "cpu" else gpu_total_memory_bytes(settings, None if device == "any" else device)
    plan = env.plan_environment(
        backend=spec.resources.backend,
        device=device,
        memory_fraction=spec.resources.fraction,
        gpu_total_bytes=total,
    )
    env.apply_environment(plan)
    if warm:  # imported on purpose, before the job: the cap below still comes before the device is touched
        plan.notes = [note for note in plan.notes if not note.startswith("frameworks already imported")]
        plan.notes.append("warm trainer: framework imported before the job, memory cap set on its arrival")
    env.cap_framework_memory(plan)
    for note in plan.notes:
        print(f"gpuyard trainer: {note}", file=sys.stderr)

    if args.dry_run:
        from models.dryrun import dry_run  # imports Keras: only now that the environment is set

        report = dry_run(spec, summary)
        emitter.emit("dry_run", env=plan.to_dict(), report=report)
        if not report.get("ok"):
            problems = [Problem(**p) for p in report.get("errors", [])]
            raise SpecError(problems or "the dry run failed without naming a problem")
        return int(ExitCode.SUCCEEDED)

    from worker.trainer import run  # imports Keras: only now that the environment is set

    job = TrainingJob(
        spec=spec,
        summary=summary,
        data_path=args.data,
        out_dir=args.out,
        resume=args.resume,
        env=plan,
        settings=settings,
        emitter=emitter,
        stop=stop,
        started=started,
    )
    return run.train(job)


# ── warm mode: started ahead of its job ──────────────────────────────────────────────────────────────


def warm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.trainer --warm",
        description="Import the framework now, then read one job (a JSON line) from stdin and train it. "
        'The line: {"argv": [the cold command line\'s arguments], "log": PATH, "cwd": DIR}.',
    )
    parser.add_argument("--backend", required=True, choices=env.BACKENDS, help="Keras backend to import")
    parser.add_argument("--gpu", required=True, help="GPU UUID or 'cpu': pinned now, before the import")
    return parser


def preload(backend: str, gpu: str) -> env.EnvPlan:
    """Pin the device and import Keras with ``backend`` without touching the device.

    Only the variables read at import are set here (backend, ``CUDA_VISIBLE_DEVICES``); the memory cap
    (TensorFlow's logical device, ``XLA_PYTHON_CLIENT_MEM_FRACTION``) is the job's, and is set once the
    job arrives, before the framework first touches the GPU (``cap_framework_memory``).
    """
    plan = env.plan_environment(backend=backend, device=gpu, memory_fraction=None, gpu_total_bytes=None)
    plan.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)  # the job's fraction, set when it arrives
    env.apply_environment(plan)
    from worker.trainer import run  # noqa: F401  the import the warm process exists for: Keras, the backend

    if gpu == "cpu":
        warm_up_step()
    return plan


def warm_up_step() -> None:
    """Train a throw-away two-layer model for one step, so that the job's first step finds the runtime ready.

    What a first ``fit`` pays whatever the model (the framework's thread pools and kernels, Keras' trainer
    and data-adapter code, ``tf.data``, the optimizer's update path) is paid here, before the job arrives;
    the job's own model still traces its step. CPU only: on a GPU this would touch the device before the
    job's memory cap is set. ``clear_session`` then resets Keras' layer names and graph state, so the job's
    model is built exactly as in a cold trainer.
    """
    import keras  # late: the trainer imports Keras only once its environment (backend, device) is set
    import numpy as np  # late: with Keras, only where a step is trained

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((16, 4), np.float32), np.zeros(16, np.int64)
    model.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0)
    model.evaluate(x, y, batch_size=8, verbose=0)
    keras.backend.clear_session(free_memory=True)


def read_job(stdin: TextIO) -> dict[str, Any] | None:
    """The job line handed over the pipe; None at end of file (the pool let this trainer go)."""
    line = stdin.readline()
    if not line.strip():
        return None
    request = json.loads(line)
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list):
        raise ValueError(f"Expected a JSON object with an 'argv' list. Received: {line[:200]!r}")
    return request


def redirect_stderr(path: str) -> None:
    """Send fds 1 and 2 (and with them C libraries' output) to the job's log from now on."""
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    os.close(fd)


def warm_main(argv: Sequence[str]) -> int:
    """A warm trainer: import now, wait for the job on stdin, then run it as the cold command line would."""
    args = warm_parser().parse_args(argv)
    events_stream = claim_stdout()
    route_logs_to_stderr()
    preload(args.backend, args.gpu)
    print(WARM_READY_LINE, file=sys.stderr, flush=True)
    try:
        request = read_job(sys.stdin)
    except ValueError as exc:
        print(f"gpuyard trainer: bad job line: {exc}", file=sys.stderr)
        return int(ExitCode.INTERNAL_ERROR)
    if request is None:
        return 0
    received = time.monotonic()
    if request.get("log"):
        redirect_stderr(str(request["log"]))
    if request.get("cwd"):
        os.chdir(request["cwd"])
    job_argv = [str(a) for a in request["argv"]]
    backend = _flag(job_argv, "--backend") or args.backend
    gpu = _flag(job_argv, "--gpu") or args.gpu
    if backend != args.backend or gpu != args.gpu:
        print(f"gpuyard trainer: warm for {args.backend} on {args.gpu}, job wants {backend} on {gpu}",
              file=sys.stderr)  # fmt: skip
        return int(ExitCode.INTERNAL_ERROR)
    return run_job(job_argv, events_stream, received, warm=True)


def _flag(argv: Sequence[str], name: str) -> str | None:
    for index, value in enumerate(argv[:-1]):
        if value == name:
            return argv[index + 1]
    return None
