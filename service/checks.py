"""The checks the API runs out of process: the sandboxed HDF5 validator and the trainer's dry run.

Both run in child processes, so the API process never opens an untrusted HDF5 file itself and never
imports a deep-learning framework.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import DataError, Problem, SpecError
from core.exitcodes import ExitCode
from core.names import DATASET_SUMMARY_FILE, SPEC_FILE
from core.settings import Settings
from core.trainer import FAILED_EVENT, trainer_argv
from models.data.sandbox import check_file
from models.data.summary import DataKeys, DatasetSummary
from service.errors import DryRunFailed, TooManyRequests
from worker import procs
from worker.watchdog import HostMemoryWatchdog


def sandbox_check_dataset(
    path: Path, keys: DataKeys, sha256: str | None = None, *, settings: Settings
) -> DatasetSummary:
    """Validate an uploaded HDF5 file in the sandboxed child process, under ``settings``' limits.

    ``sha256`` is the file's hash when the caller has it (the upload hashed it while streaming).

    Raises:
        DataError: every reason the file is refused.
    """
    return check_file(path, keys, limits=settings, sha256=sha256)


# Sets the address-space limit in the child, then execs the command. Not preexec_fn: that is unsafe in a
# process with threads (the event hub's listener, the lease keepers), where the child may deadlock before exec.
_EXEC_UNDER_RLIMIT_AS = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)
# What a child that ran out of address space leaves behind: Python's MemoryError, C++'s bad_alloc (an
# abort), glibc's ENOMEM text, TensorFlow's ResourceExhaustedError text (reported as build_failed).
_MEMORY_SIGNS = ("MemoryError", "bad_alloc", "Cannot allocate memory", "out of memory", "OOM when allocating")
_HOST_MEMORY_INTERVAL_S = 0.2


class DryRunGate:
    """At most ``concurrency`` dry runs at once in this API process; one more answers 429 at once.

    Args:
        runner: the dry runner to guard (:func:`trainer_dry_run` with its limits bound).
        concurrency: dry runs allowed at once, across the process's request threads.
        retry_after_s: the ``Retry-After`` a refused caller gets.
    """

    def __init__(
        self,
        runner: Callable[[dict[str, Any], Path, DatasetSummary], dict[str, Any]],
        concurrency: int,
        retry_after_s: int = 5,
    ) -> None:
        self.runner = runner
        self.concurrency = concurrency
        self.retry_after_s = retry_after_s
        self._slots = threading.BoundedSemaphore(concurrency)

    def __call__(self, spec: dict[str, Any], data_path: Path, summary: DatasetSummary) -> dict[str, Any]:
        if not self._slots.acquire(blocking=False):
            raise TooManyRequests(
                f"{self.concurrency} dry runs are already running on this server "
                f"(GPUYARD_DRY_RUN_CONCURRENCY={self.concurrency}); retry in a few seconds",
                code="too_many_dry_runs",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        try:
            return self.runner(spec, data_path, summary)
        finally:
            self._slots.release()


def trainer_dry_run(
    spec: dict[str, Any],
    data_path: Path,
    summary: DatasetSummary,
    *,
    timeout_s: float,
    memory_bytes: int | None = None,
    host_memory_bytes: int | None = None,
) -> dict[str, Any]:
    """Run ``python -m worker.trainer --dry-run`` on a spec and a stored data set; return its report.

    Args:
        spec: the job spec as submitted (already validated by parse_spec).
        data_path: the stored HDF5 file.
        summary: its checked summary for the spec's keys (the trainer verifies the sha256, scans nothing).
        timeout_s: seconds before the child is killed.
        memory_bytes: the child's address-space limit (RLIMIT_AS); None for none.
        host_memory_bytes: the host memory (RSS of its process group) the child may hold, watched as a
            trainer's is (``core.hostmem.trainer_memory_limit``: the API passes a trainer's limit); past
            it the group is killed. None for none.

    Returns:
        The ``dry_run`` event's fields (``report``: parameters, layer table, memory estimate, warnings;
        ``env``: the environment the trainer would use).

    Raises:
        SpecError / DataError: the trainer refused the spec or the data (every problem listed), or the
            child ran out of its ``memory_bytes`` or ``host_memory_bytes`` (code ``dry_run_out_of_memory``,
            naming the limit).
        DryRunFailed: the child crashed or ran past ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="gpuyard-dryrun-") as tmp:
        spec_path = Path(tmp) / SPEC_FILE
        spec_path.write_text(json.dumps(spec))
        summary_path = Path(tmp) / DATASET_SUMMARY_FILE
        summary_path.write_text(summary.model_dump_json())
        out = Path(tmp) / "out"
        command = trainer_argv(spec=spec_path, data=data_path, summary=summary_path, out=out, dry_run=True)
        if memory_bytes is not None:
            command = [sys.executable, "-c", _EXEC_UNDER_RLIMIT_AS, str(memory_bytes), *command]
        # A dry run builds on the CPU; hide GPUs so it never takes memory from running jobs.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        done, host_memory = _run_watched(command, env, timeout_s, host_memory_bytes)
    if host_memory is not None:
        raise _out_of_memory_error(host_memory, "GPUYARD_TRAINER_MEMORY_BYTES, a trainer's host-memory limit")
    events = [_parse(line) for line in done.stdout.splitlines() if line.strip()]
    for event in events:
        if event.get("event") == "dry_run":
            report = event.get("report") or {}
            errors = json.dumps(report.get("errors") or [])
            if memory_bytes is not None and any(sign in errors for sign in _MEMORY_SIGNS):
                raise _out_of_memory_error(memory_bytes)  # Keras could not allocate the weights under the limit
            return {k: v for k, v in event.items() if k not in ("event", "time")}
    failed = next((e for e in reversed(events) if e.get("event") == FAILED_EVENT), None)
    if failed is not None:
        problems = [
            Problem(p.get("code", "invalid"), p.get("detail", ""), p.get("field")) for p in failed.get("problems", [])
        ] or [Problem(failed.get("reason", "invalid"), failed.get("detail", "the dry run failed"))]
        if done.returncode == ExitCode.SPEC_INVALID:
            raise SpecError(problems)
        if done.returncode == ExitCode.DATASET_INVALID:
            raise DataError(problems)
    if memory_bytes is not None and _out_of_memory(done):
        raise _out_of_memory_error(memory_bytes)
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    raise DryRunFailed(f"the dry run ended with exit code {done.returncode}: {tail[0][:300]}")


def _run_watched(
    command: list[str], env: dict[str, str], timeout_s: float, host_memory_bytes: int | None
) -> tuple[subprocess.CompletedProcess[str], int | None]:
    """Run the child in its own process group, its host memory watched as a trainer's is.

    Returns:
        The finished child, and the limit it went past (its group was killed) or None.

    Raises:
        DryRunFailed: past ``timeout_s`` (its group is killed).
    """
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # its own group: the watchdog and the timeout kill all of it
    )
    watchdog = None
    if host_memory_bytes is not None:
        watchdog = HostMemoryWatchdog(proc.pid, host_memory_bytes, _HOST_MEMORY_INTERVAL_S, "dry-run")
        watchdog.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        procs.signal_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DryRunFailed(f"the dry run took longer than {timeout_s:g} s") from exc
    finally:
        if watchdog is not None:
            watchdog.stop()
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    exceeded = watchdog is not None and watchdog.exceeded.is_set()
    return done, (host_memory_bytes if exceeded else None)


def _out_of_memory_error(memory_bytes: int, setting: str = "GPUYARD_DRY_RUN_MEMORY_BYTES") -> SpecError:
    return SpecError(
        [
            Problem(
                "dry_run_out_of_memory",
                f"architecture: building this model needed more than the dry run's memory limit of "
                f"{memory_bytes:,} bytes ({setting}); make the model smaller",
                "architecture",
            )
        ]
    )


def _out_of_memory(done: subprocess.CompletedProcess[str]) -> bool:
    """Whether a failed child ran out of its address space (exit code, a fatal signal, or its last words)."""
    if done.returncode in (ExitCode.OUT_OF_MEMORY, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGKILL):
        return True
    return any(sign in done.stderr[-20000:] for sign in _MEMORY_SIGNS)


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
