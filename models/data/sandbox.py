"""The data-set checks of :mod:`models.data.inspect`, run in a fresh child process under resource limits.

libhdf5 still gets memory-safety bugs from crafted files, so an upload is never opened in a process that
matters. :func:`check_file` starts ``python -m models.data.sandbox`` (a fresh interpreter: no fork of a
process that has h5py loaded), sends the request as JSON on stdin and reads one JSON line from stdout.
The child sets its rlimits (address space, CPU seconds, no core files, no file writes) *before* importing
h5py, and never imports Keras or a framework. Whatever happens to the child — a crash, the memory or CPU
limit, the wall-clock timeout — the caller gets a :class:`~core.errors.DataError`, never another
exception.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.errors import DataError, Problem
from core.settings import DataLimits, get_settings
from models.data.summary import ArrayInfo, DataKeys, DatasetSummary

#: The settings the child needs (the data limits); nothing else (secrets, URLs) is sent to it.
CHILD_LIMITS = tuple(DataLimits.model_fields)
#: Modules the child must never load; the reply lists any that are loaded, and tests check it is empty.
FRAMEWORKS = ("keras", "tensorflow", "jax", "torch")
_FILE_SIZE_LIMIT = 1 << 20  # the child writes no files; this caps anything a library might try
_OPEN_FILES_LIMIT = 256
_STDERR_TAIL = 2000
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the models package


def check_file(
    path: str | os.PathLike[str],
    keys: DataKeys | None = None,
    *,
    limits: DataLimits | None = None,
    timeout_s: float | None = None,
    sha256: str | None = None,
) -> DatasetSummary:
    """Check an HDF5 data set in a sandboxed child process and return its summary.

    Args:
        path: the HDF5 file.
        keys: which keys hold which array (defaults: ``X_train``/``Y_train``/…).
        limits: the checks' limits and the child's rlimits (``validate_memory_bytes``,
            ``validate_cpu_seconds``); defaults to the process settings.
        timeout_s: wall-clock limit for the child; default ``2 × validate_cpu_seconds + 10``.
        sha256: the file's SHA-256 when the caller hashed it already (uploads are hashed while they
            stream in), so the file is not read once more for it.

    Returns:
        The data set's summary, as :func:`models.data.inspect.inspect_file` computes it.

    Raises:
        DataError: the file is refused (every reason the checks found), or the child crashed
            (``validator_crashed``), ran out of memory (``validator_memory_limit``) or time
            (``validator_time_limit``).
    """
    limits = limits or get_settings()
    request = {
        "path": str(Path(path).resolve()),
        "keys": (keys or DataKeys()).model_dump(),
        "limits": {name: getattr(limits, name) for name in CHILD_LIMITS},
        "sha256": sha256,
    }
    if timeout_s is None:
        timeout_s = 2.0 * limits.validate_cpu_seconds + 10.0
    reply = run_child(request, timeout_s=timeout_s)
    if reply.get("ok"):
        return DatasetSummary.model_validate(reply["summary"])
    raise DataError([Problem(**problem) for problem in reply["problems"]])


def check_inputs(
    path: str | os.PathLike[str], key: str = "X", *, limits: DataLimits | None = None, timeout_s: float | None = None
) -> ArrayInfo:
    """Check an HDF5 file of inputs only (a predict batch: one array ``key``) in the sandboxed child.

    Returns:
        The array's key, shape, dtype and rows, as :func:`models.data.inspect.inspect_inputs` finds them.

    Raises:
        DataError: as :func:`check_file`.
    """
    limits = limits or get_settings()
    request = {
        "path": str(Path(path).resolve()),
        "inputs_key": key,
        "limits": {name: getattr(limits, name) for name in CHILD_LIMITS},
    }
    if timeout_s is None:
        timeout_s = 2.0 * limits.validate_cpu_seconds + 10.0
    reply = run_child(request, timeout_s=timeout_s)
    if reply.get("ok"):
        return ArrayInfo.model_validate(reply["array"])
    raise DataError([Problem(**problem) for problem in reply["problems"]])


def run_child(request: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """Run the child on one request and return its reply; failures of the child become problems.

    Returns:
        ``{"ok": True, "summary": …, "child": …}`` or ``{"ok": False, "problems": [...], "child": …}``;
        ``child`` reports the child's rlimits and loaded frameworks (absent when the child did not reply).
    """
    name = Path(request["path"]).name
    cpu_seconds = int(request["limits"]["validate_cpu_seconds"])
    cpu_before = _children_cpu_seconds()
    try:
        proc = subprocess.run(
            _child_command(),
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=_ROOT,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _failure(
            "validator_time_limit",
            f"checking {name} took longer than {timeout_s:g} s (wall clock); expected the check to finish in "
            "time — the file may be crafted to be slow to read",
        )
    except OSError as exc:
        return _failure("validator_crashed", f"the validator for {name} could not start ({exc})")
    reply = _parse_reply(proc.stdout)
    if proc.returncode == 0 and reply is not None:
        return reply
    stderr_tail = (proc.stderr or "")[-_STDERR_TAIL:].strip()
    if proc.returncode < 0:
        signum = -proc.returncode
        used = _children_cpu_seconds() - cpu_before
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and used >= cpu_seconds):
            return _failure(
                "validator_time_limit",
                f"checking {name} used more than {cpu_seconds} CPU seconds (validate_cpu_seconds); expected "
                "less — the file may be crafted to be slow to read",
            )
        if signum == signal.SIGKILL:
            return _failure(
                "validator_memory_limit",
                f"the validator for {name} was killed (SIGKILL), most likely for memory; expected the check "
                "to fit in validate_memory_bytes",
            )
        return _failure(
            "validator_crashed",
            f"the validator crashed on {name} with signal {_signal_name(signum)}; the file is refused "
            "(it may be crafted to exploit the HDF5 library)",
        )
    if "MemoryError" in stderr_tail:
        return _failure("validator_memory_limit", _memory_detail(name, request))
    last_line = stderr_tail.splitlines()[-1] if stderr_tail else "no output"
    return _failure(
        "validator_crashed",
        f"the validator failed on {name} (exit status {proc.returncode}: {last_line}); the file is refused",
    )


def _child_command() -> list[str]:
    """The child's command line: a fresh interpreter without user site-packages (its environment is ours)."""
    return [sys.executable, "-s", "-m", "models.data.sandbox"]


def _child_env() -> dict[str, str]:
    """A minimal environment: no secrets, one BLAS thread, and no HDF5 filter plugins loaded.

    PYTHONPATH is the caller's own import path, so the child imports the same gpuyard and h5py as its
    parent whether gpuyard is installed, run from a checkout, or carried onto a machine by PYTHONPATH.
    """
    return {
        "PATH": os.defpath,
        "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry),
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
        "HDF5_PLUGIN_PRELOAD": "::",  # "::" disables loading filter plugins: a file cannot pull in a library
    }


def _parse_reply(stdout: str | None) -> dict[str, Any] | None:
    lines = [line for line in (stdout or "").splitlines() if line.strip()]
    if not lines:
        return None
    try:
        reply = json.loads(lines[-1])
    except ValueError:
        return None
    if not isinstance(reply, dict) or "ok" not in reply:
        return None
    if not reply["ok"] and not isinstance(reply.get("problems"), list):
        return None
    return reply


def _failure(code: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "problems": [{"code": code, "detail": detail}]}


def _memory_detail(name: str, request: dict[str, Any]) -> str:
    limit = int(request["limits"]["validate_memory_bytes"])
    return (
        f"checking {name} needed more than {limit / 2**20:.0f} MiB of memory (validate_memory_bytes); "
        "expected less — the file may be crafted to exhaust memory (e.g. huge chunks)"
    )


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# ------------------------------------------------------------------------------------------ the child side


def _set_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """Lower this process's rlimits (never above the existing hard limits)."""

    def lower(which: int, value: int, hard_extra: int = 0) -> None:
        _soft, hard = resource.getrlimit(which)
        new_hard = value + hard_extra if hard == resource.RLIM_INFINITY else min(hard, value + hard_extra)
        resource.setrlimit(which, (min(value, new_hard), new_hard))

    lower(resource.RLIMIT_AS, memory_bytes)
    # SIGXCPU at the soft limit; the hard limit (SIGKILL) two seconds later in case it is caught.
    lower(resource.RLIMIT_CPU, cpu_seconds, hard_extra=2)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT)
    lower(resource.RLIMIT_NOFILE, _OPEN_FILES_LIMIT)


def _child_report() -> dict[str, Any]:
    limits = {
        name: list(resource.getrlimit(getattr(resource, name)))
        for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")
    }
    loaded = sorted(m for m in FRAMEWORKS if m in sys.modules)
    return {"rlimits": limits, "frameworks": loaded, "pid": os.getpid()}


def _child_main() -> int:
    """Read one request from stdin, check the file under rlimits, write one JSON line to stdout."""
    request = json.loads(sys.stdin.read())
    limits_in = request["limits"]
    _set_limits(int(limits_in["validate_memory_bytes"]), int(limits_in["validate_cpu_seconds"]))
    try:
        # h5py is imported only now, under the limits.
        from models.data.inspect import inspect_file, inspect_inputs

        reply: dict[str, Any]
        if request.get("inputs_key"):
            array = inspect_inputs(
                request["path"], request["inputs_key"], limits=DataLimits.model_construct(**limits_in)
            )
            reply = {"ok": True, "array": array.model_dump(mode="json")}
        else:
            summary = inspect_file(
                request["path"],
                DataKeys.model_validate(request["keys"]),
                limits=DataLimits.model_construct(**limits_in),
                sha256=request.get("sha256"),
            )
            reply = {"ok": True, "summary": summary.model_dump(mode="json")}
    except DataError as exc:
        reply = {"ok": False, "problems": [p.to_dict() for p in exc.problems]}
    except MemoryError:
        reply = _failure("validator_memory_limit", _memory_detail(Path(request["path"]).name, request))
    except Exception as exc:  # a bug or an h5py error the checks did not translate: refuse, do not leak
        reply = _failure(
            "validator_crashed",
            f"the validator failed on {Path(request['path']).name} ({type(exc).__name__}: {exc}); "
            "the file is refused",
        )
    reply["child"] = _child_report()
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
