"""The GPU inventory: what NVML (or a fake stand-in) says about each device and the processes on it.

Two backends answer the same questions (:class:`GpuBackend`):

* :class:`NvmlBackend` asks the driver through nvidia-ml-py. Without a driver (``NVMLError`` on init)
  it logs ONE line and answers an empty inventory; it never raises an NVML error to its caller.
* :class:`FakeBackend`, chosen by ``GPUYARD_FAKE_GPUS=2x16GiB``, simulates devices with stable UUIDs
  ``GPU-00000000-0000-0000-0000-<index as 12 digits>`` so the scheduler, pinning, watchdog and hygiene
  run on CPU machines. A fake device's processes are the declarations in ``fake_gpu_dir/<uuid>/``: one
  JSON file per process, ``{"pid": P, "memory_bytes": N}``; ``N`` null means "this process's RSS"
  (psutil). A declaration whose pid is dead is ignored; one with ``"pid": null`` is memory used on the
  device that no process accounts for (what a leaked context looks like). The supervisor declares each
  trainer it starts on a fake GPU; a test (or the fake trainer) may replace the figure, and may declare
  "foreign" processes to take capacity away.

Nothing here imports a framework or touches CUDA: NVML only reads the driver's bookkeeping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from core.settings import Settings

log = logging.getLogger(__name__)

GiB = 2**30
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|GB|MB)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GiB, "mib": 2**20, "gb": 10**9, "mb": 10**6}


@dataclass(frozen=True)
class GpuProcess:
    """One compute process on a GPU, as NVML lists it (host pid)."""

    pid: int
    memory_bytes: int


@dataclass
class GpuInfo:
    """One GPU at one instant."""

    uuid: str
    index: int
    pci_bus_id: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int | None
    processes: list[GpuProcess] = field(default_factory=list)

    @property
    def unaccounted_bytes(self) -> int:
        """Used memory that no listed process holds: the driver's own, or memory a dead process leaked."""
        return max(0, self.memory_used_bytes - sum(p.memory_bytes for p in self.processes))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "processes": [asdict(p) for p in self.processes]}


class GpuBackend(Protocol):
    """Where GPU readings come from (NVML or fake)."""

    kind: str  # "nvml" | "fake"

    def devices(self) -> list[GpuInfo]:
        """Every GPU with its readings; empty without a driver."""
        ...

    def device(self, uuid: str) -> GpuInfo | None:
        """One GPU's readings, or None when there is no such GPU."""
        ...


# ── NVML ──────────────────────────────────────────────────────────────────────────────────────────────
class NvmlBackend:
    """Readings from the NVIDIA driver. ``nvmlInit`` once per process, lazily; no driver → empty."""

    kind = "nvml"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self._pynvml: Any = None

    def _init(self) -> bool:
        with self._lock:
            if self._ready is None:
                try:
                    import pynvml  # optional: nvidia-ml-py may be missing, and no driver is fine
                except ImportError:
                    log.info("GPU inventory: nvidia-ml-py is not installed; no GPUs")
                    self._ready = False
                    return False
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as exc:
                    log.info("GPU inventory: no NVIDIA driver (%s); no GPUs, CPU only", exc)
                    self._ready = False
                    return False
                self._pynvml = pynvml
                self._ready = True
            return self._ready

    def devices(self) -> list[GpuInfo]:
        if not self._init():
            return []
        nv = self._pynvml
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            log.warning("GPU inventory: NVML cannot count devices: %s", exc)
            return []
        found = []
        for index in range(count):
            with contextlib.suppress(nv.NVMLError):
                found.append(self._read(nv.nvmlDeviceGetHandleByIndex(index), index))
        return found

    def device(self, uuid: str) -> GpuInfo | None:
        if not self._init():
            return None
        nv = self._pynvml
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid)
            return self._read(handle, int(nv.nvmlDeviceGetIndex(handle)))
        except nv.NVMLError:
            return None

    def _read(self, handle: Any, index: int) -> GpuInfo:
        nv = self._pynvml
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization: int | None = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nv.NVMLError:
            utilization = None
        try:
            running = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except nv.NVMLError:
            running = []
        processes = [GpuProcess(int(p.pid), int(p.usedGpuMemory or 0)) for p in running]
        return GpuInfo(
            uuid=_text(nv.nvmlDeviceGetUUID(handle)),
            index=index,
            pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(handle).busId),
            name=_text(nv.nvmlDeviceGetName(handle)),
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_percent=utilization,
            processes=processes,
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ── fake ──────────────────────────────────────────────────────────────────────────────────────────────
def fake_uuid(index: int) -> str:
    """The stable UUID of fake GPU ``index``."""
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


def parse_fake_gpus(text: str) -> list[int]:
    """``"2x16GiB"`` or ``"1x80GiB,1x40GiB"`` → the devices' sizes in bytes, in index order.

    Raises:
        ValueError: the text is not a comma-separated list of ``<count>x<size>[GiB|MiB|GB|MB]``.
    """
    sizes: list[int] = []
    for part in text.split(","):
        match = _SIZE.match(part)
        if not match or int(match.group(1)) < 1:
            raise ValueError(
                "Expected fake GPUs as '<count>x<size>GiB', comma-separated, e.g. '2x16GiB'. "
                f"Received: fake_gpus={text!r}"
            )
        unit = _UNITS[(match.group(3) or "GiB").lower()]
        sizes += [int(float(match.group(2)) * unit)] * int(match.group(1))
    return sizes


class FakeBackend:
    """Simulated GPUs whose processes are declaration files (see the module docstring)."""

    kind = "fake"

    def __init__(self, spec: str, state_dir: Path) -> None:
        self.sizes = parse_fake_gpus(spec)
        self.state_dir = Path(state_dir)

    def devices(self) -> list[GpuInfo]:
        return [self._read(index) for index in range(len(self.sizes))]

    def device(self, uuid: str) -> GpuInfo | None:
        for index in range(len(self.sizes)):
            if fake_uuid(index) == uuid:
                return self._read(index)
        return None

    def _read(self, index: int) -> GpuInfo:
        uuid = fake_uuid(index)
        total = self.sizes[index]
        processes: list[GpuProcess] = []
        unaccounted = 0
        for record in _declarations(self.state_dir / uuid):
            pid = record.get("pid")
            memory = record.get("memory_bytes")
            if pid is None:
                unaccounted += int(memory or 0)
                continue
            try:
                proc = psutil.Process(int(pid))
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                figure = int(memory) if memory is not None else int(proc.memory_info().rss)
            except (psutil.Error, ValueError, TypeError):
                continue
            processes.append(GpuProcess(int(pid), figure))
        used = min(total, unaccounted + sum(p.memory_bytes for p in processes))
        return GpuInfo(
            uuid=uuid,
            index=index,
            pci_bus_id=f"00000000:{index + 1:02X}:00.0",
            name=f"Fake GPU {total / GiB:g} GiB",
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=total - used,
            utilization_percent=min(100, 40 * len(processes)),
            processes=processes,
        )


def _declarations(folder: Path) -> list[dict[str, Any]]:
    records = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(folder.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if isinstance(record, dict):
                    records.append(record)
    return records


def declare_fake_process(
    state_dir: Path, gpu_uuid: str, pid: int | None, memory_bytes: int | None, *, name: str | None = None
) -> Path:
    """Declare a process (or, with ``pid`` None, unattributed memory) on fake GPU ``gpu_uuid``.

    Args:
        state_dir: ``settings.fake_gpu_dir``.
        gpu_uuid: the fake GPU.
        pid: the process (host pid), or None for memory no process holds (a leak).
        memory_bytes: its memory, or None for the process's RSS.
        name: the declaration's file name (default: the pid); declaring the same name again replaces it.

    Returns:
        The declaration file: delete it to take the declaration back.
    """
    folder = Path(state_dir) / gpu_uuid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or pid}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "memory_bytes": memory_bytes}))
    os.replace(tmp, path)
    return path


def forget_fake_process(state_dir: Path, gpu_uuid: str, name: str | int) -> None:
    """Remove a declaration made by :func:`declare_fake_process`."""
    (Path(state_dir) / gpu_uuid / f"{name}.json").unlink(missing_ok=True)


# ── choosing a backend, selecting GPUs ────────────────────────────────────────────────────────────────
def get_backend(settings: Settings) -> GpuBackend:
    """The fake backend when ``settings.fake_gpus`` is set, else NVML."""
    if settings.fake_gpus:
        assert settings.fake_gpu_dir is not None  # filled in by Settings
        return FakeBackend(settings.fake_gpus, settings.fake_gpu_dir)
    return NvmlBackend()


def gpu_total_memory_bytes(settings: Settings, uuid: str | None = None) -> int | None:
    """Total memory of the GPU with this UUID (or of the first GPU when ``uuid`` is None).

    Returns:
        Bytes, or None when there is no driver, no GPU, or no such GPU.
    """
    backend = get_backend(settings)
    if uuid is None:
        devices = backend.devices()
        return devices[0].memory_total_bytes if devices else None
    device = backend.device(uuid)
    return device.memory_total_bytes if device is not None else None


def context_allowance_bytes(settings: Settings) -> int:
    """The watchdog's allowance beyond fraction × total: the setting, else 1 GiB on real GPUs, 0 on fakes."""
    if settings.gpu_context_allowance_bytes is not None:
        return settings.gpu_context_allowance_bytes
    return 0 if settings.fake_gpus else GiB


def budget_bytes(memory_fraction: float, total_bytes: int, allowance_bytes: int) -> int:
    """The GPU memory a job may hold: ``min(total, fraction × total + allowance)``.

    One formula for the dispatcher's room, the watchdog's kill line and what GET /v1/gpus shows.
    """
    return min(total_bytes, int(memory_fraction * total_bytes) + allowance_bytes)


def fraction_for(need_bytes: int, total_bytes: int, allowance_bytes: int, margin: float) -> float:
    """The smallest memory_fraction (in hundredths, at least 0.01) whose :func:`budget_bytes` holds
    ``need_bytes × margin``: the inverse of the budget formula, for automatic and suggested budgets. Above
    1 when no GPU of ``total_bytes`` is big enough."""
    wanted = need_bytes * margin - allowance_bytes
    return max(0.01, math.ceil(100 * wanted / total_bytes - 1e-9) / 100)


def select_gpus(devices: Sequence[GpuInfo], selection: str) -> list[GpuInfo]:
    """The devices named by ``selection``: ``all``, NVML indices ``0,1``, or UUIDs ``GPU-…`` (comma-separated).

    Raises:
        ValueError: an index or UUID names no device.
    """
    selection = selection.strip()
    if selection in ("all", ""):
        return list(devices)
    by_index = {d.index: d for d in devices}
    by_uuid = {d.uuid: d for d in devices}
    chosen: list[GpuInfo] = []
    for item in (part.strip() for part in selection.split(",")):
        found = by_uuid.get(item) or (by_index.get(int(item)) if item.isdigit() else None)
        if found is None:
            known = ", ".join(f"{d.index}={d.uuid}" for d in devices) or "none"
            raise ValueError(f"Expected 'all', GPU indices or UUIDs among [{known}]. Received: {item!r}")
        if found not in chosen:
            chosen.append(found)
    return chosen


def inventory(settings: Settings) -> list[dict[str, Any]]:
    """Every GPU's readings as plain dicts (what ``gpuyard gpus``-style tools print)."""
    return [d.to_dict() for d in get_backend(settings).devices()]


def declare_fake_process_if_absent(state_dir: Path, gpu_uuid: str, pid: int) -> None:
    """Declare ``pid`` on fake GPU ``gpu_uuid`` at its RSS, unless it already declared a figure itself."""
    folder = Path(state_dir) / gpu_uuid
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"{pid}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"pid": pid, "memory_bytes": None}))
