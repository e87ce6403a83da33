"""The trainer's exit codes and their machine-readable reasons; importable without any framework."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """How ``python -m worker.trainer`` ended. ``reason`` is the string used in events and job records."""

    SUCCEEDED = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    SPEC_INVALID = 3
    DATASET_INVALID = 4
    OUT_OF_MEMORY = 5
    CANCELLED = 6
    TIME_LIMIT = 7
    UNHEALTHY = 8  # a health finding listed in the spec's training.stop_on (models/health.py)

    @property
    def reason(self) -> str:
        return self.name.lower()

    @property
    def is_users_fault(self) -> bool:
        """True when the job itself is to blame (bad spec, bad data, too big), not the infrastructure."""
        return self in (
            ExitCode.SPEC_INVALID,
            ExitCode.DATASET_INVALID,
            ExitCode.OUT_OF_MEMORY,
            ExitCode.TIME_LIMIT,
            ExitCode.UNHEALTHY,
        )
