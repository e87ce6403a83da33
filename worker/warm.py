"""Warm trainers: one trainer process per worker slot, started ahead with its framework imported.

A warm trainer is ``python -m worker.trainer --warm --backend B --gpu G`` under the parent-death launcher,
in its own session and process group, with ``CUDA_VISIBLE_DEVICES`` pinned: it imports Keras and the
backend without touching the device, then blocks reading one JSON line on stdin. The supervisor that
takes it writes the job's command line there (``hand_over``); the trainer sets the job's memory cap,
trains and exits, as a cold trainer would. One process per job still, killed as a group, memory checked
back to baseline after it: only the import moved ahead.

The next warm trainer is started once the job that took the last one has done its first training step
(or ended): importing a framework takes seconds of CPU, which the job's own start (building the model,
compiling the first step) would otherwise share.

Where the pool lives: in the process that runs the slot's jobs (the Celery prefork child, long-lived,
one job at a time), in a module-level registry keyed by the slot's device. It is started from that
process's main thread, which matters: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the
child ends, so a warm trainer started from a short-lived thread would be sent SIGTERM with it (the pool
then finds it dead and starts cold, which is safe, only slower).

A warm trainer is used only when it is alive, was started for the same backend and device, and by the
same settings and code (``fingerprint``); otherwise it is discarded (SIGKILL: it holds nothing yet) and
the job starts cold. The next one is for the backend of the job that just arrived. The pool never imports
a framework itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from core.trainer import trainer_command, warm_trainer_argv
from worker import procs
from worker.trainer.events import WARM_READY_LINE

log = logging.getLogger(__name__)

_PACKAGES = ("core", "models", "worker")
_REGISTRY: dict[str, WarmPool] = {}
_REGISTRY_LOCK = threading.Lock()


def warm_trainers_enabled(settings: Settings, gpu: str) -> bool:
    """Whether a slot on ``gpu`` keeps a warm trainer: the setting, else only on a real GPU."""
    if settings.warm_trainers is not None:
        return settings.warm_trainers
    return gpu not in ("cpu", "any", "") and not settings.fake_gpus


def slot_uses_warm_trainers(settings: Settings, gpu: str, *, substituted: bool) -> bool:
    """Whether a slot keeps warm trainers. Left to its default, only with the real trainer: a substituted
    command (``trainer_command``, a test's stand-in) must understand ``--warm``, so it needs the setting."""
    return warm_trainers_enabled(settings, gpu) and (bool(settings.warm_trainers) or not substituted)


def code_fingerprint(root: Path | None = None) -> str:
    """Size and modification time of every source file the trainer runs: a change makes warm ones stale."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            with contextlib.suppress(OSError):
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fingerprint(environ: dict[str, str], argv: Sequence[str]) -> str:
    """What a warm trainer was started with: its command, its environment, the code on disk."""
    payload = json.dumps({"argv": list(argv), "env": sorted(environ.items())}, sort_keys=True)
    return hashlib.sha256(f"{payload}\n{code_fingerprint()}".encode()).hexdigest()


@dataclass
class WarmTrainer:
    """One started trainer waiting for its job."""

    proc: subprocess.Popen[bytes]
    backend: str
    gpu: str
    fingerprint: str
    log_path: Path | None = None

    def alive(self) -> bool:
        return not procs.has_exited(self.proc)

    def ready(self) -> bool:
        """Whether its framework import is done (it said so in its log); a job handed earlier just waits."""
        if self.log_path is None or not self.alive():
            return False
        try:
            return WARM_READY_LINE.encode() in self.log_path.read_bytes()
        except OSError:
            return False

    def discard(self) -> None:
        """Kill its group and reap it (it holds no job and no device memory yet)."""
        procs.signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            procs.reap(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class WarmPool:
    """The warm trainer of one slot (one device); at most one waiting at a time.

    Args:
        settings: the worker's settings (the trainer's environment is built from them).
        gpu: the slot's device, a GPU UUID or ``cpu``.
        trainer_argv: the trainer's command (``python -m worker.trainer``).
        log_dir: where warm trainers write what they print before their job arrives.
    """

    def __init__(self, settings: Settings, gpu: str, trainer_argv: Sequence[str], log_dir: Path) -> None:
        self.settings = settings
        self.gpu = gpu
        self.trainer_argv = list(trainer_argv)
        self.log_dir = log_dir
        self.waiting: WarmTrainer | None = None
        self._lock = threading.Lock()

    def _command(self, backend: str) -> list[str]:
        return warm_trainer_argv(self.trainer_argv, backend=backend, gpu=self.gpu)

    def _fingerprint(self, backend: str) -> str:
        return fingerprint(procs.trainer_env(self.settings), self._command(backend))

    def start(self, backend: str) -> WarmTrainer:
        """Start a warm trainer for ``backend`` now (replacing any waiting one)."""
        with self._lock:
            if self.waiting is not None:
                self.waiting.discard()
                self.waiting = None
            command = self._command(backend)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"warm-{self.gpu}.log"
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    procs.launcher_argv(command),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    start_new_session=True,  # its own process group, as a cold trainer's
                    env=procs.trainer_env(self.settings),
                    cwd=self.log_dir,
                )
            self.waiting = WarmTrainer(proc, backend, self.gpu, self._fingerprint(backend), log_path)
            log.info("warm trainer %d started for %s on %s", proc.pid, backend, self.gpu)
            return self.waiting

    def take(self, backend: str, *, start_next: bool = True) -> subprocess.Popen[bytes] | None:
        """The waiting trainer if it fits a job on ``backend`` (alive, same settings and code), else None.

        Either way the slot's next warm trainer is started for ``backend``: at once, or, with
        ``start_next=False``, when the caller calls :meth:`start` (the supervisor does once the job's
        first step is done, so that the next import does not take CPU from the job's own start).
        """
        with self._lock:
            waiting, self.waiting = self.waiting, None
        taken: subprocess.Popen[bytes] | None = None
        if waiting is not None:
            why = None
            if waiting.backend != backend:
                why = f"warm for {waiting.backend}, job wants {backend}"
            elif not waiting.alive():
                why = f"it exited ({waiting.proc.returncode if waiting.proc.returncode is not None else 'unreaped'})"
            elif waiting.fingerprint != self._fingerprint(backend):
                why = "settings or code changed since it started"
            if why is None:
                taken = waiting.proc
            else:
                log.info("warm trainer %d discarded: %s; starting the job cold", waiting.proc.pid, why)
                waiting.discard()
        if start_next:
            self.start(backend)
        return taken

    def close(self) -> None:
        """Let the waiting trainer go (end of file on its stdin, then SIGKILL: it holds nothing)."""
        with self._lock:
            waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.discard()


def pool_for(settings: Settings, gpu: str, trainer_argv: Sequence[str]) -> WarmPool:
    """This process's pool for the slot on ``gpu`` (created on first use)."""
    key = f"{gpu}|{' '.join(trainer_argv)}"
    with _REGISTRY_LOCK:
        pool = _REGISTRY.get(key)
        if pool is None or pool.settings != settings:
            if pool is not None:
                pool.close()
            pool = WarmPool(settings, gpu, trainer_argv, settings.data_dir / "warm")
            _REGISTRY[key] = pool
        return pool


def close_all() -> None:
    """Let every warm trainer of this process go (tests, worker shutdown)."""
    with _REGISTRY_LOCK:
        pools = list(_REGISTRY.values())
        _REGISTRY.clear()
    for pool in pools:
        pool.close()


def hand_over(proc: subprocess.Popen[bytes], argv: Sequence[str], log_path: Path, cwd: Path) -> None:
    """Give a warm trainer its job: the cold command line's arguments, its log, its working directory.

    Raises:
        OSError: the trainer is gone (broken pipe); the caller treats it as a trainer that died.
    """
    assert proc.stdin is not None
    line = json.dumps({"argv": list(argv), "log": str(log_path), "cwd": str(cwd)}) + "\n"
    try:
        proc.stdin.write(line.encode())
        proc.stdin.flush()
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def default_trainer_argv() -> list[str]:
    return trainer_command()
