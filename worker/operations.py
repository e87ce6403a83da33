"""Runs one model operation (evaluate, predict, export a finished job's model) for the task ``gpuyard.operate``.

::

    start_operation ─ not queued: a second delivery, or it ended → return, do nothing
      │
    request: the job's model.h5, its batch size; the data set (evaluate), the input file (predict), the job's
      │      folder (export) → operations/<op_id>/request.json
    child  python -m worker.trainer.ops --request …  (own process group, SIGTERM'd if this process dies,
      │    stderr appended to operations/<op_id>/ops.log, host memory capped as a trainer's is, killed past
      │    operation_timeout_s)
    finish_operation: succeeded with the child's result, or failed with its reason

Nothing here imports a framework: TensorFlow lives only in the child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import threading
from pathlib import Path
from typing import Any

from core.atomicio import atomic_write_json
from core.hostmem import trainer_memory_limit
from core.names import MODEL_H5
from core.settings import Settings
from core.trainer import ops_argv
from models.spec import JobSpec
from store import Database, Operation
from store.errors import JobDBError
from worker import procs
from worker.storage import Storage, operation_dir
from worker.watchdog import HostMemoryWatchdog

log = logging.getLogger(__name__)

REQUEST_FILE = "request.json"
OPERATION_LOG = "ops.log"
_HOST_MEMORY_INTERVAL_S = 0.5
_GRACE_S = 3.0


class OperationFailed(Exception):
    """The operation cannot run or did not finish; ``reason`` and ``detail`` go to its record."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def run_operation(operation_id: str, settings: Settings, *, db: Database, storage: Storage) -> dict[str, Any]:
    """Run operation ``operation_id`` to its end (idempotent: only a queued one starts) and record it.

    Returns:
        ``{"operation", "ran", "state"}`` for the task's result.
    """
    operation = db.start_operation(operation_id)
    if operation is None:
        log.info("operation %s: not queued (delivered twice, or over); nothing to do", operation_id)
        return {"operation": operation_id, "ran": False}
    try:
        result = _run(operation, settings, db, storage)
    except OperationFailed as failed:
        db.finish_operation(operation_id, reason=failed.reason, detail=failed.detail)
        return {"operation": operation_id, "ran": True, "reason": failed.reason}
    except Exception as exc:  # a bug here must end the record, not leave it running forever
        log.exception("operation %s: worker error", operation_id)
        with contextlib.suppress(JobDBError):
            db.finish_operation(operation_id, reason="internal_error", detail=f"{type(exc).__name__}: {exc}")
        raise
    db.finish_operation(operation_id, result=result)
    return {"operation": operation_id, "ran": True}


def _run(operation: Operation, settings: Settings, db: Database, storage: Storage) -> dict[str, Any]:
    job = db.get_job(operation.job_id)
    if job is None:
        raise OperationFailed("job_missing", f"job {operation.job_id} was deleted")
    job_dir = storage.local_path(storage.job_key(job.id))
    model = job_dir / MODEL_H5
    if not model.is_file():
        raise OperationFailed("model_missing", f"job {job.id} has no {MODEL_H5} in storage")
    folder = operation_dir(storage, job.id, operation.id)
    folder.mkdir(parents=True, exist_ok=True)
    spec = JobSpec.model_validate(job.spec)
    request: dict[str, Any] = {
        "kind": operation.kind,
        "model": str(model),
        "batch_size": spec.training.batch_size,
        "in_memory_limit_bytes": settings.in_memory_limit_bytes,
    }
    asked = operation.request
    if operation.kind == "evaluate":
        dataset = db.get_dataset(asked["dataset"])
        if dataset is None or not storage.exists(dataset.storage_key):
            raise OperationFailed("dataset_missing", f"data set {asked['dataset']} was deleted")
        request |= {"data": str(storage.local_path(dataset.storage_key)), "summary": dataset.summary}
        request["split"] = asked.get("split", "test")
    elif operation.kind == "predict":
        request |= {"inputs": str(folder / asked["input_file"]), "key": asked.get("key", "X")}
    else:
        request |= {"out": str(job_dir), "formats": list(asked["formats"])}
    atomic_write_json(folder / REQUEST_FILE, request)
    return _run_child(operation.id, folder, settings)


def _run_child(operation_id: str, folder: Path, settings: Settings) -> dict[str, Any]:
    argv = ops_argv(folder / REQUEST_FILE)
    with (folder / OPERATION_LOG).open("ab") as log_file:
        proc = subprocess.Popen(
            procs.launcher_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,  # its own group: the watchdog and the time limit stop all of it
            env=procs.trainer_env(settings),
            cwd=folder,
        )
    memory = HostMemoryWatchdog(proc.pid, trainer_memory_limit(settings), _HOST_MEMORY_INTERVAL_S, operation_id)
    memory.start()
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        procs.terminate_group(proc.pid, _GRACE_S)

    timer = threading.Timer(settings.operation_timeout_s, stop)
    timer.start()
    try:
        stdout, _ = proc.communicate()
    finally:
        timer.cancel()
        memory.stop()
    if timed_out.is_set():
        raise OperationFailed(
            "operation_time_limit",
            f"the operation ran longer than {settings.operation_timeout_s:g} s (operation_timeout_s) and was stopped",
        )
    if memory.exceeded.is_set():
        raise OperationFailed(
            "out_of_memory",
            f"the operation held {(memory.exceeded_bytes or 0) // 2**20} MiB of host memory, over its limit of "
            f"{memory.limit_bytes // 2**20} MiB (trainer_memory_bytes); killed",
        )
    reply = _last_json_line(stdout)
    if reply is None:
        raise OperationFailed(
            "internal_error", f"the operation's process ended (exit status {proc.returncode}) without a result"
        )
    if not reply.get("ok"):
        raise OperationFailed(str(reply.get("reason") or "internal_error"), str(reply.get("detail") or ""))
    return dict(reply.get("result") or {})


def _last_json_line(stdout: bytes) -> dict[str, Any] | None:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.strip():
            try:
                reply = json.loads(line)
            except ValueError:
                return None
            return reply if isinstance(reply, dict) else None
    return None
