"""Fault injection on a running ``gpuyard up`` stack: find each process type, kill it, watch the trainers.

Imported by name by the fault-injection tests (SQLite and PostgreSQL). Process types are found by their
command lines under the stack's process tree (psutil), as an operator with ``ps`` would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from stack_helpers import RunningStack

# A small digits Highway: a few seconds of Keras import, then about 0.2-0.5 s per epoch on a 2-core box.
FAULT_SPEC: dict[str, Any] = {
    "name": "fault",
    "architecture": {"family": "highway", "input_shape": [64], "depth": 2, "width": 64},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "training": {"epochs": 25, "batch_size": 32, "validation_split": 0.1, "seed": 0},
    "resources": {"memory_fraction": 0.25, "gpu": "any", "max_runtime_s": 900},
}

KILL_ORDER = ("trainer", "pool_child", "celery_main", "api_worker", "api_master", "janitor", "redis")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def trainer_job(argv: list[str]) -> str | None:
    """The job id of a trainer command line (``python -m worker.trainer … --out …/jobs/<id>``)."""
    if "worker.trainer" not in argv or "--warm" in argv:
        return None
    if "--out" in argv and argv.index("--out") + 1 < len(argv):
        return Path(argv[argv.index("--out") + 1]).name
    return None


def processes(stack: RunningStack) -> dict[str, list[psutil.Process]]:
    """The stack's live processes by type: redis, api_master, api_worker, fleet, celery_main, pool_child,
    trainer, janitor (trainers re-parented to ``gpuyard up`` are still in its tree: it is their subreaper)."""
    found: dict[str, list[psutil.Process]] = defaultdict(list)
    try:
        tree = [p for p in psutil.Process(stack.process.pid).children(recursive=True) if _alive(p)]
    except psutil.Error:
        return found
    argv = {p.pid: _cmdline(p) for p in tree}
    kind: dict[int, str] = {}
    for proc in tree:
        line = argv[proc.pid]
        text = " ".join(line)
        parent = kind.get(_ppid(proc) or -1)
        if "redis-server" in text:
            kind[proc.pid] = "redis"
        elif "gunicorn" in text:
            parent_line = " ".join(argv.get(_ppid(proc) or -1, []))
            kind[proc.pid] = "api_worker" if "gunicorn" in parent_line else "api_master"
        elif trainer_job(line) is not None:
            kind[proc.pid] = "trainer"
        elif "celery" in text and "worker.celery_app" in text:
            parent_line = " ".join(argv.get(_ppid(proc) or -1, []))
            kind[proc.pid] = "pool_child" if "worker.celery_app" in parent_line else "celery_main"
        elif "janitor" in line:
            kind[proc.pid] = "janitor"
        elif "worker" in line and "--gpus" in line:
            kind[proc.pid] = "fleet"
        elif parent is not None:
            kind[proc.pid] = f"{parent}_child"
    for proc in tree:
        if proc.pid in kind:
            found[kind[proc.pid]].append(proc)
    return found


@dataclass
class TrainerWatch:
    """Polls the stack's trainers in a thread: which process groups ran each job, and the most alive at once."""

    stack: RunningStack
    interval_s: float = 0.1
    groups: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    most_at_once: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    overlaps: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TrainerWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            # A trainer is a process group (its own helpers are forked into it): count groups, not pids.
            alive: dict[str, set[int]] = defaultdict(set)
            try:  # the stack's own tree: trainers orphaned by a kill are re-parented to `gpuyard up`, its subreaper
                tree = psutil.Process(self.stack.process.pid).children(recursive=True)
            except psutil.Error:
                continue
            for proc in tree:
                job = trainer_job(_cmdline(proc))
                if job is not None and _alive(proc):
                    with contextlib.suppress(OSError):
                        alive[job].add(os.getpgid(proc.pid))
            for job, pids in alive.items():
                self.groups[job].update(pids)
                self.most_at_once[job] = max(self.most_at_once[job], len(pids))
                if len(pids) > 1:
                    self.overlaps.append(f"job {job}: trainer process groups {sorted(pids)} alive at once")


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, detail: Callable[[], str] = str) -> Any:
    """Poll ``condition`` until it is truthy (its value is returned); fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{detail()}")
        time.sleep(0.2)


def ready(stack: RunningStack) -> bool:
    try:
        return requests.get(stack.url + "/v1/ready", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def kill(
    stack: RunningStack, what: str, pick: Callable[[list[psutil.Process]], psutil.Process] | None = None
) -> Killed:
    """SIGKILL one process of type ``what`` (the first found, or ``pick``'s)."""
    candidates = processes(stack).get(what, [])
    assert candidates, f"no {what} process in the stack: {dict(processes(stack))}"
    target = pick(candidates) if pick else candidates[0]
    assert target.pid in {p.pid for p in candidates}, f"pid {target.pid} is not a {what} of the stack"
    killed = Killed(what, target.pid, _identity(what, _cmdline(target)), time.time())
    os.kill(target.pid, signal.SIGKILL)
    return killed


@dataclass(frozen=True)
class Killed:
    """One kill: the process type, its pid, what names its replacement, and when."""

    what: str
    pid: int
    identity: str
    at: float


def _identity(what: str, argv: list[str]) -> str:
    """What a replacement shares with the killed process: a Celery worker's node name, a trainer's job."""
    if what in ("celery_main", "pool_child") and "--hostname" in argv:
        return argv[argv.index("--hostname") + 1]
    if what == "trainer":
        return trainer_job(argv) or ""
    return ""


def recovered(stack: RunningStack, killed: Killed) -> bool:
    """A process of the killed type, started after the kill, with the same identity (the same Celery node,
    the same job's next trainer) runs, and the API answers /v1/ready. An orphan of the kill (a gunicorn
    worker whose master died) does not count: it started before."""
    for proc in processes(stack).get(killed.what, []):
        try:
            fresh = proc.create_time() >= killed.at - 0.5 and proc.pid != killed.pid
        except psutil.Error:
            continue
        if fresh and _identity(killed.what, _cmdline(proc)) == killed.identity:
            return ready(stack)
    return False
