"""The GPU memory watchdog of one running job, and the hygiene check after it ends.

A framework's cap (``XLA_PYTHON_CLIENT_MEM_FRACTION``, TensorFlow's logical-device limit, torch's
per-process fraction) protects neighbours only if it holds and every process on the GPU has one; the
watchdog is the backstop. It reads the GPU's per-process memory (NVML, or the fake backend) every
``gpu_watchdog_interval_s`` and sums what the processes of the trainer's process group hold. Over the
job's budget — ``memory_fraction × total + allowance`` (``gpu_context_allowance_bytes``: the CUDA context
and library workspaces that no cap covers; 1 GiB on real GPUs, 0 on fakes) — it SIGKILLs the group at
once: a neighbour may be about to fail its next allocation.

NVML lists host pids. In a container without ``--pid=host`` they do not match ours and the watchdog
sees nothing (it logs this once); run workers with the host's pid namespace.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from worker import procs
from worker.gpus import GpuBackend, GpuInfo

log = logging.getLogger(__name__)


def group_memory(info: GpuInfo, pgid: int) -> tuple[int, set[int]]:
    """Bytes held on the GPU by processes of group ``pgid``, and their pids."""
    held, pids = 0, set()
    for process in info.processes:
        try:
            if os.getpgid(process.pid) != pgid:
                continue
        except OSError:  # gone, or not in our pid namespace
            continue
        held += process.memory_bytes
        pids.add(process.pid)
    return held, pids


class MemoryWatchdog(threading.Thread):
    """Watches one trainer's process group on one GPU; kills it past ``budget_bytes``.

    After :meth:`stop`: ``peak_bytes`` (the most the group held at one reading), ``exceeded_bytes``
    (the reading that killed it, or None), ``pids`` (every pid of the group seen on the GPU).
    """

    def __init__(
        self, backend: GpuBackend, gpu_uuid: str, pgid: int, budget_bytes: int, interval_s: float, job_id: str = ""
    ) -> None:
        super().__init__(name=f"gpu-watchdog-{job_id or pgid}", daemon=True)
        self.backend, self.gpu_uuid, self.pgid = backend, gpu_uuid, pgid
        self.budget_bytes, self.interval_s, self.job_id = budget_bytes, interval_s, job_id
        self.peak_bytes = 0
        self.exceeded_bytes: int | None = None
        self.pids: set[int] = set()
        self.readings = 0
        self.exceeded = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            self.sample()
            if self.exceeded.is_set():
                return
            self._stopping.wait(self.interval_s)

    def sample(self) -> int | None:
        """One reading; kills the group when it is over budget. Returns the bytes held, None if unreadable."""
        try:
            info = self.backend.device(self.gpu_uuid)
        except Exception:  # a driver hiccup must not kill the job; the next reading tries again
            log.exception("job %s: GPU watchdog could not read %s", self.job_id, self.gpu_uuid)
            return None
        if info is None:
            return None
        held, pids = group_memory(info, self.pgid)
        self.readings += 1
        self.pids |= pids
        self.peak_bytes = max(self.peak_bytes, held)
        if held > self.budget_bytes and not self.exceeded.is_set():
            self.exceeded_bytes = held
            procs.signal_group(self.pgid, signal.SIGKILL)
            self.exceeded.set()
            log.warning(
                "job %s: %d MiB of GPU memory, over its budget of %d MiB: trainer group killed",
                self.job_id,
                held // 2**20,
                self.budget_bytes // 2**20,
            )
        return held

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5)


class HostMemoryWatchdog(threading.Thread):
    """Keeps one trainer's process group within ``limit_bytes`` of host memory (the sum of their RSS).

    The host must never be the one to run out: past the limit the group is SIGKILLed at once and the job
    fails ``out_of_memory``. ``peak_bytes`` is the most the group held at one reading.
    """

    def __init__(self, pid: int, limit_bytes: int, interval_s: float, job_id: str = "") -> None:
        super().__init__(name=f"host-memory-{job_id or pid}", daemon=True)
        self.pid, self.limit_bytes, self.interval_s, self.job_id = pid, limit_bytes, interval_s, job_id
        self.peak_bytes = 0
        self.exceeded_bytes: int | None = None
        self.exceeded = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set() and not self.exceeded.is_set():
            self.sample()
            self._stopping.wait(self.interval_s)

    def sample(self) -> int:
        """One reading of the group's RSS; kills the group when it is over the limit. Returns the bytes held."""
        held = procs.tree_rss_bytes(self.pid)
        self.peak_bytes = max(self.peak_bytes, held)
        if held > self.limit_bytes and not self.exceeded.is_set():
            self.exceeded_bytes = held
            procs.signal_group(self.pid, signal.SIGKILL)
            self.exceeded.set()
            log.warning(
                "job %s: trainer holds %d MiB of host memory, over its limit of %d MiB: killed",
                self.job_id,
                held // 2**20,
                self.limit_bytes // 2**20,
            )
        return held

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5)


def hygiene_problem(
    backend: GpuBackend,
    gpu_uuid: str,
    job_pids: set[int],
    unaccounted_before: int,
    tolerance_bytes: int,
    wait_s: float,
    poll_s: float = 0.2,
) -> str | None:
    """After a job: why the GPU is not clean, or None once it is (waiting up to ``wait_s`` for the driver).

    Clean means none of the job's processes is still listed, and the memory no listed process holds
    (driver reservations, leaked contexts) is at most ``tolerance_bytes`` above what it was before the job.
    """
    deadline = time.monotonic() + wait_s
    while True:
        info = backend.device(gpu_uuid)
        if info is None:
            return None  # the GPU is not readable here: nothing to judge
        leftover = sorted(p.pid for p in info.processes if p.pid in job_pids)
        grown = info.unaccounted_bytes - unaccounted_before
        if not leftover and grown <= tolerance_bytes:
            return None
        if time.monotonic() >= deadline:
            if leftover:
                return f"processes {leftover} of the job are still listed on the GPU {wait_s:g} s after it ended"
            return (
                f"{grown / 2**20:.0f} MiB of GPU memory held by no process appeared during the job "
                f"(tolerance {tolerance_bytes / 2**20:.0f} MiB)"
            )
        time.sleep(poll_s)
