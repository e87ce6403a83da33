"""The little the worker asks of NVML: how much memory a GPU has. No framework import."""

from __future__ import annotations

import contextlib


def gpu_total_memory_bytes(uuid: str | None = None) -> int | None:
    """Total memory of the GPU with this UUID (or of NVML's device 0 when ``uuid`` is None).

    Returns:
        Bytes, or None when there is no NVML (no driver, no GPU) or no such device.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0) if uuid is None else pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
