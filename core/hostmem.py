"""The host memory one training process group may hold: the one formula for trainers, model operations
and the API's dry-run child (each watched by ``worker.watchdog.HostMemoryWatchdog``)."""

from __future__ import annotations

import psutil

from core.settings import Settings


def trainer_memory_limit(settings: Settings) -> int:
    """The host memory one trainer's process group may hold: the setting, else half of this host's."""
    return settings.trainer_memory_bytes or psutil.virtual_memory().total // 2
