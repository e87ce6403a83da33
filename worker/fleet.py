"""One Celery worker per GPU, and the heartbeats that tell the dispatcher which GPUs are online.

``gpuyard worker --gpus all`` runs :func:`run_fleet`: for each selected GPU it registers the GPU in the
job DB and starts a child ``celery worker`` with

    CUDA_DEVICE_ORDER=PCI_BUS_ID  CUDA_VISIBLE_DEVICES=<uuid>  GPUYARD_WORKER_GPU=<uuid>
    -Q gpu.<uuid>  -n gpu<index>@<host>  -c <slots>

and, unless ``--no-cpu-worker``, one more child on the CPU queue (``GPUYARD_TRAIN_QUEUE``, where the
dispatcher sends jobs with ``resources.gpu: cpu``) whose trainers see no GPU:

    CUDA_VISIBLE_DEVICES=""  GPUYARD_WORKER_GPU=cpu  -Q <train_queue>  -n <train_queue>@<host>  -c <slots>

while this process (which never touches CUDA: NVML only reads the driver's bookkeeping) publishes every
``gpu_heartbeat_s`` each GPU's readings to Redis (worker/heartbeat.py keys and writes them) with a TTL of
``gpu_heartbeat_ttl_s``: memory, utilization, and its processes, each marked gpuyard's (a descendant of
that GPU's worker) or foreign. No heartbeat → the GPU is offline and gets no new jobs. A child that
exits stops the fleet (its supervisor — ``gpuyard up``, compose, systemd — restarts the whole).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import redis

from core.settings import Settings
from store import Database
from store.errors import JobDBError
from worker.gpus import GpuBackend, GpuInfo, get_backend, select_gpus
from worker.heartbeat import heartbeat, publish, withdraw
from worker.procs import set_parent_death_signal
from worker.queues import gpu_queue

log = logging.getLogger(__name__)


@dataclass
class WorkerPlan:
    """One child ``celery worker`` serving one GPU, or (``gpu`` None) the CPU queue with no GPU visible."""

    gpu: GpuInfo | None
    name: str
    queue: str
    slots: int
    proc: subprocess.Popen[bytes] | None = None
    #: Queues consumed beside ``queue``: the notify queue (its tasks are short; a slot that a finished job
    #: frees takes that job's notification at once).
    extra_queues: tuple[str, ...] = ()

    def pinning(self) -> dict[str, str]:
        """The environment that pins this worker's trainers: its GPU's UUID, or no GPU at all."""
        if self.gpu is None:
            return {"CUDA_VISIBLE_DEVICES": "", "GPUYARD_WORKER_GPU": "cpu"}
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": self.gpu.uuid,
            "GPUYARD_WORKER_GPU": self.gpu.uuid,
        }

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, **self.pinning()}

    def describe(self) -> str:
        """``GPU 0 (GPU-…)`` or ``CPU``."""
        return "CPU" if self.gpu is None else f"GPU {self.gpu.index} ({self.gpu.uuid})"

    def argv(self, loglevel: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *self.celery_args(loglevel)]

    def celery_args(self, loglevel: str) -> list[str]:
        """``worker …``: the arguments after ``celery -A worker.celery_app`` (also ``worker_main``'s)."""
        return [
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(self.slots),
            "--queues",
            ",".join((self.queue, *self.extra_queues)),
            "--hostname",
            self.name,
            "--loglevel",
            loglevel,
        ]


def plan_workers(
    backend: GpuBackend,
    selection: str,
    slots: int,
    host: str | None = None,
    *,
    cpu_queue: str | None = None,
    cpu_slots: int | None = None,
) -> list[WorkerPlan]:
    """The workers ``--gpus selection`` starts: one per selected GPU with ``slots`` each, then (when
    ``cpu_queue`` is given and a GPU was selected) one CPU worker on ``cpu_queue`` with ``cpu_slots``
    (default: ``slots``). None without GPUs.

    Raises:
        ValueError: the selection names a GPU that does not exist.
    """
    host = host or socket.gethostname()
    workers = [
        WorkerPlan(gpu=gpu, name=f"gpu{gpu.index}@{host}", queue=gpu_queue(gpu.uuid), slots=slots)
        for gpu in select_gpus(backend.devices(), selection)
    ]
    if workers and cpu_queue:
        workers.append(WorkerPlan(gpu=None, name=f"{cpu_queue}@{host}", queue=cpu_queue, slots=cpu_slots or slots))
    return workers


def descendants(pid: int | None) -> set[int]:
    """``pid`` and every process below it (empty when it is gone)."""
    if pid is None:
        return set()
    try:
        proc = psutil.Process(pid)
        return {pid, *(child.pid for child in proc.children(recursive=True))}
    except psutil.Error:
        return set()


def installed_backends() -> list[str]:
    """The Keras backends this host's trainers can import (looked up, not imported: no framework here)."""
    modules = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    return sorted(name for name, module in modules.items() if importlib.util.find_spec(module) is not None)


class Heartbeats(threading.Thread):
    """Publishes each worker's GPU heartbeat to Redis every ``gpu_heartbeat_s``, with a TTL."""

    def __init__(self, settings: Settings, backend: GpuBackend, workers: Sequence[WorkerPlan]) -> None:
        super().__init__(name="gpu-heartbeats", daemon=True)
        self.settings, self.backend = settings, backend
        self.workers = [w for w in workers if w.gpu is not None]  # the CPU worker has no GPU to report
        self.host = socket.gethostname()
        self.backends = installed_backends()
        self._client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._stopping = threading.Event()
        self._warned = False

    def beat(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        for worker in self.workers:
            assert worker.gpu is not None
            info = self.backend.device(worker.gpu.uuid)
            if info is None or worker.proc is None or worker.proc.poll() is not None:
                continue  # no reading, or no worker to take jobs: let the key expire (offline)
            record = heartbeat(
                info,
                host=self.host,
                worker=worker.name,
                slots=worker.slots,
                ours=descendants(worker.proc.pid),
                backends=self.backends,
            )
            publish(pipe, record, self.settings.gpu_heartbeat_ttl_s)
        try:
            pipe.execute()
            self._warned = False
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("GPU heartbeats: Redis unreachable (%s); GPUs look offline until it is back", exc)
                self._warned = True

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.beat()
            except Exception:  # a reading error must not end the heartbeats
                log.exception("GPU heartbeat failed")
            self._stopping.wait(self.settings.gpu_heartbeat_s)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # go offline now rather than at the TTL
            withdraw(self._client, [w.gpu.uuid for w in self.workers if w.gpu is not None])
        self._client.close()


def register(db: Database, workers: Sequence[WorkerPlan], host: str | None = None) -> None:
    """Record each worker's GPU in the job DB (kept: its drain and quarantine flags)."""
    host = host or socket.gethostname()
    for worker in workers:
        gpu = worker.gpu
        if gpu is None:
            continue  # the CPU worker
        db.register_gpu(
            gpu.uuid,
            host=host,
            index=gpu.index,
            name=gpu.name,
            memory_total_bytes=gpu.memory_total_bytes,
            backends=installed_backends(),
        )


def run_fleet(
    settings: Settings,
    workers: Sequence[WorkerPlan],
    *,
    loglevel: str = "INFO",
    backend: GpuBackend | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Start one Celery worker per GPU (and the CPU worker, when planned), publish heartbeats, and wait
    until a worker exits or a signal (SIGTERM/SIGINT) or ``stop`` ends the fleet; then stop every worker.
    Returns the exit status."""
    backend = backend or get_backend(settings)
    stop = stop or threading.Event()
    db = Database(settings.database_url)
    try:
        db.ensure_schema()  # SchemaBehind (a JobDBError): refuse, naming `gpuyard db upgrade`
        register(db, workers)
    except JobDBError as exc:
        log.error("cannot register the GPUs in the job DB: %s", exc)
        return 1
    finally:
        db.dispose()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    base_env = dict(os.environ)
    for worker in workers:
        worker.proc = subprocess.Popen(
            worker.argv(loglevel), env=worker.env(base_env), preexec_fn=set_parent_death_signal
        )
        log.info(
            "%s: worker %s on queue %s, %d slot(s)",
            worker.describe(),
            worker.name,
            worker.queue,
            worker.slots,
        )
    beats = Heartbeats(settings, backend, workers)
    beats.start()
    status = 0
    try:
        while not stop.wait(0.5):
            ended = [w for w in workers if w.proc is not None and w.proc.poll() is not None]
            if ended:
                for worker in ended:
                    code = worker.proc.returncode if worker.proc is not None else None
                    log.error("worker %s exited with %s; stopping the fleet", worker.name, code)
                status = 1
                break
    finally:
        beats.stop()
        _stop_workers(workers)
    return status


def _stop_workers(workers: Sequence[WorkerPlan], grace_s: float = 30.0) -> None:
    """SIGTERM every worker (Celery's warm shutdown), SIGKILL what is left after ``grace_s``."""
    running = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
