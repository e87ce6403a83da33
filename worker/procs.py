"""Process-group helpers for trainers: start one in its own group, tied to its parent; stop a whole group.

Run as ``python -m worker.procs --parent-pid PID -- ARGV...`` it is the launcher the supervisor puts in
front of the trainer: it asks Linux to send the trainer SIGTERM when the supervising process dies
(``PR_SET_PDEATHSIG``, kept across ``exec``), so a worker killed with ``kill -9`` does not leave an
orphaned trainer holding a GPU while the janitor hands the job to another worker. SIGTERM, not SIGKILL,
so the orphan checkpoints before it exits; the next supervisor on the same host waits for it (see
``stop_stale_trainer``). It also lowers the trainer's CPU priority by ``trainer_nice`` (read from the
``GPUYARD_TRAINER_NICE`` that :func:`trainer_env` puts in every trainer's environment), so that training
that saturates the CPUs leaves the API, Redis and the janitor responsive.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from core.settings import Settings

_PR_SET_PDEATHSIG = 1
#: Where the launcher finds how much to lower the trainer's priority (``Settings.trainer_nice``).
NICE_ENV = "GPUYARD_TRAINER_NICE"


def launcher_argv(argv: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """The command that runs ``argv`` under the parent-death launcher (same interpreter)."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "worker.procs", "--parent-pid", str(parent), "--", *argv]


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def lower_priority(increment: int) -> int:
    """Add ``increment`` to this process's niceness (kept across ``exec`` and by its children); the new
    niceness. Unprivileged processes may only lower their priority, which is all this does."""
    return os.nice(max(0, increment))


def group_alive(pgid: int) -> bool:
    """True while a process that is not a zombie (exited, waiting to be reaped) is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False if the group is already gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout_s: float, poll_s: float = 0.05, reap_pid: int | None = None) -> bool:
    """Wait up to ``timeout_s`` for group ``pgid`` to empty; reap ``reap_pid`` (our child) meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        if reap_pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(reap_pid, os.WNOHANG)
        if not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def terminate_group(pgid: int, grace_s: float, reap_pid: int | None = None) -> bool:
    """SIGTERM the group, SIGKILL whatever is left after ``grace_s``; True if it had to kill."""
    if not signal_group(pgid, signal.SIGTERM):
        return False
    if wait_group_gone(pgid, grace_s, reap_pid=reap_pid):
        return False
    signal_group(pgid, signal.SIGKILL)
    wait_group_gone(pgid, 5.0, reap_pid=reap_pid)
    return True


# --- the trainer's pid file: lets the next supervisor on this host wait for an orphan ----------------


def write_pid_file(path: Path, pid: int) -> None:
    """Record the trainer ``pid`` (its group leader) with this host's name and the process start time."""
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.Error:
        create_time = None
    record = {"host": socket.gethostname(), "pid": pid, "create_time": create_time}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def stop_stale_trainer(path: Path, grace_s: float) -> int | None:
    """Stop the trainer recorded in ``path`` if it still runs on this host; returns its pid, else None.

    The record is trusted only when host name and process start time both match, so a recycled pid is
    never signalled.
    """
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        proc = psutil.Process(pid)
        if record.get("create_time") is not None and abs(proc.create_time() - record["create_time"]) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    terminate_group(pid, grace_s)
    return pid


# --- the trainer as a child of the supervisor: its environment, its exit, its stdout -----------------

_TRAINER_WITHOUT = ("database_url", "redis_url")
#: What :func:`read_lines` puts on its queue when the trainer's stdout closes.
EOF = object()


def trainer_env(settings: Settings) -> dict[str, str]:
    """The trainer's environment: ours, plus the settings as ``GPUYARD_*`` so both read the same values
    (less the DB and Redis URLs: a trainer reports through stdout only). The launcher reads
    ``GPUYARD_TRAINER_NICE`` from it to lower the trainer's CPU priority."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and not isinstance(value, dict | list):
            env[f"GPUYARD_{name.upper()}"] = str(value)
    for name in _TRAINER_WITHOUT:  # the trainer needs neither; they may carry passwords
        env.pop(f"GPUYARD_{name.upper()}", None)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the trainer exited, without reaping it: its zombie keeps the group id from being reused."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def read_lines(stream: IO[bytes], events: queue.Queue[Any]) -> None:
    try:
        for line in iter(stream.readline, b""):
            events.put(line)
    except (OSError, ValueError):
        pass
    finally:
        events.put(EOF)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (0 once they are gone)."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for our child ``proc`` and return its peak resident memory in bytes (``ru_maxrss``); sets
    ``proc.returncode`` as ``Popen.wait`` would."""
    if proc.returncode is not None:
        return 0
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped elsewhere
        proc.wait()
        return 0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return int(usage.ru_maxrss) * 1024  # kilobytes on Linux


def _launch(args: list[str]) -> int:
    if len(args) < 4 or args[0] != "--parent-pid" or args[2] != "--":
        print("usage: python -m worker.procs --parent-pid PID -- ARGV...", file=sys.stderr)
        return 2
    parent_pid = int(args[1])
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return 1
    lower_priority(int(os.environ.get(NICE_ENV) or 0))
    argv = args[3:]
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
