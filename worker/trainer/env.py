"""Process setup before any framework import: device pinning, backend, memory cap, stop signals.

Nothing here imports Keras, TensorFlow, JAX or torch at module level. The order the trainer follows:

1. ``plan_environment`` (pure: what to set, from the job's resources and the GPU's NVML total),
2. ``apply_environment`` (sets the environment variables the frameworks read when they load),
3. ``cap_framework_memory`` (imports TensorFlow or torch only, and caps the GPU before it is touched),
4. only then ``import keras``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

from core.exitcodes import ExitCode

BACKENDS = ("tensorflow", "jax", "torch")
# JAX's own default fraction: set explicitly so that a newer JAX cannot grow to the whole GPU.
JAX_DEFAULT_MEMORY_FRACTION = 0.75


@dataclass
class EnvPlan:
    """What the trainer sets up for one job; recorded in the ``started`` event and summary.json.

    Attributes:
        backend: ``tensorflow`` | ``jax`` | ``torch``.
        device: ``cpu``, a GPU/MIG UUID, or ``any`` (leave ``CUDA_VISIBLE_DEVICES`` as the parent set it).
        memory_fraction: share of the GPU's memory the job may use (None: no cap asked for).
        gpu_total_bytes: the GPU's memory according to NVML (None without a driver or on cpu).
        environ: environment variables set before the framework loads.
        memory_cap: how the cap is enforced, in words (``none`` when it is not).
        memory_limit_mib: TensorFlow's logical-device limit (fraction × NVML total), else None.
        framework_cap_applied: set by ``cap_framework_memory``: whether the framework accepted the cap.
    """

    backend: str
    device: str
    memory_fraction: float | None
    gpu_total_bytes: int | None
    environ: dict[str, str] = field(default_factory=dict)
    memory_cap: str = "none"
    memory_limit_mib: int | None = None
    framework_cap_applied: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_environment(
    *,
    backend: str,
    device: str | None,
    memory_fraction: float | None,
    gpu_total_bytes: int | None,
) -> EnvPlan:
    """Compute the environment for one job, without touching the process.

    Args:
        backend: Keras backend, one of ``tensorflow``, ``jax``, ``torch``.
        device: ``cpu``, a GPU UUID (``GPU-…``/``MIG-…``), or ``any``/None (use what the parent left visible).
        memory_fraction: in (0, 1], or None for no cap.
        gpu_total_bytes: the GPU's total memory from NVML, needed for TensorFlow's cap in MiB.

    Raises:
        ValueError: for an unknown backend or a fraction outside (0, 1].
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected backend in {BACKENDS}. Received: backend={backend!r}")
    if memory_fraction is not None and not 0 < memory_fraction <= 1:
        raise ValueError(f"Expected a memory fraction in (0, 1]. Received: memory_fraction={memory_fraction}")
    device = "any" if device in (None, "", "any") else device
    on_cpu = device == "cpu"
    plan = EnvPlan(
        backend=backend,
        device=device,
        memory_fraction=None if on_cpu else memory_fraction,
        gpu_total_bytes=None if on_cpu else gpu_total_bytes,
    )
    env = plan.environ
    # NVML and nvidia-smi count GPUs in PCI bus order; CUDA's default order differs.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device != "any":
        env["CUDA_VISIBLE_DEVICES"] = device
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax":
        if on_cpu:
            env["JAX_PLATFORMS"] = "cpu"
        else:
            fraction = memory_fraction if memory_fraction is not None else JAX_DEFAULT_MEMORY_FRACTION
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"
            plan.memory_fraction = fraction
            plan.memory_cap = f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:g} (preallocated by XLA)"
    elif not on_cpu and memory_fraction is not None:
        if backend == "tensorflow":
            if gpu_total_bytes:
                plan.memory_limit_mib = max(1, int(memory_fraction * gpu_total_bytes / 2**20))
                plan.memory_cap = f"tensorflow logical device memory_limit={plan.memory_limit_mib} MiB"
            else:
                plan.notes.append("no NVML total for the GPU: TensorFlow runs without a memory cap")
        else:
            plan.memory_cap = f"torch.cuda.set_per_process_memory_fraction({memory_fraction:g}, 0)"
    return plan


def apply_environment(plan: EnvPlan, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the plan's variables in ``environ`` (the process's environment by default).

    Call it before the first import of Keras or a framework: they read these variables once, on load.
    """
    environ = os.environ if environ is None else environ
    loaded = [name for name in ("tensorflow", "jax", "torch", "keras") if name in sys.modules]
    if loaded:
        plan.notes.append(f"frameworks already imported before setup: {', '.join(loaded)}")
    for name, value in plan.environ.items():
        if name == "TF_CPP_MIN_LOG_LEVEL" and name in environ:
            plan.environ[name] = environ[name]
            continue
        environ[name] = value


def cap_framework_memory(plan: EnvPlan) -> EnvPlan:
    """Apply the backend's in-process memory cap: import the framework, cap the GPU before it is used.

    TensorFlow: a logical device with ``memory_limit`` (memory growth cannot be combined with it).
    torch: ``set_per_process_memory_fraction``. JAX: nothing here (its variable is already set).
    """
    if plan.device == "cpu" or plan.memory_fraction is None:
        return plan
    if plan.backend == "tensorflow" and plan.memory_limit_mib is not None:
        import tensorflow as tf  # only now: the cap must be set before the GPU is first touched

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=plan.memory_limit_mib)]
            )
        plan.framework_cap_applied = bool(gpus)
    elif plan.backend == "torch":
        import torch  # only now: the cap must be set before the GPU is first touched

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(plan.memory_fraction, 0)
            plan.framework_cap_applied = True
    elif plan.backend == "jax":
        plan.framework_cap_applied = "XLA_PYTHON_CLIENT_MEM_FRACTION" in plan.environ
    return plan


class TrainingStopped(Exception):
    """Training ended early on purpose (cancelled or out of time); the checkpoint is already written."""

    def __init__(self, exit_code: ExitCode, detail: str) -> None:
        super().__init__(detail)
        self.exit_code = exit_code
        self.detail = detail


class StopFlag:
    """Set by SIGTERM/SIGINT or by passing the runtime limit; the training loop polls ``check()``.

    Args:
        max_runtime_s: seconds since ``started`` after which ``check`` raises ``time_limit`` (None: no limit).
        started: monotonic time the job started (the trainer passes its process start).
    """

    def __init__(
        self,
        max_runtime_s: float | None = None,
        *,
        started: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._started = clock() if started is None else started
        self.max_runtime_s = max_runtime_s
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def request(self, reason: str = "requested") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def set_max_runtime(self, max_runtime_s: float | None) -> None:
        self.max_runtime_s = max_runtime_s

    def stop_reason(self) -> TrainingStopped | None:
        """The reason to stop now, or None to go on."""
        if self._event.is_set():
            return TrainingStopped(ExitCode.CANCELLED, f"stopped by {self.signal_name}")
        if self.max_runtime_s is not None:
            elapsed = self._clock() - self._started
            if elapsed > self.max_runtime_s:
                return TrainingStopped(
                    ExitCode.TIME_LIMIT, f"ran {elapsed:.1f} s, past max_runtime_s={self.max_runtime_s:g}"
                )
        return None

    def check(self) -> None:
        """Raise ``TrainingStopped`` when the job must stop."""
        reason = self.stop_reason()
        if reason is not None:
            raise reason
