"""The trainer's JSON-lines events on stdout: one object per line, flushed, batch events rate-limited."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from core.trainer import FAILED_EVENT

__all__ = ["FAILED_EVENT", "WARM_READY_LINE", "EventEmitter", "jsonable"]

#: What a warm trainer writes to stderr once its framework is imported (worker/warm.py reads it there).
WARM_READY_LINE = "gpuyard trainer: warm, framework imported, waiting for a job"


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: numpy scalars/arrays to Python, NaN/Inf to None, unknowns to str."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, framework tensors converted by numpy
        return jsonable(value.tolist())
    if hasattr(value, "__float__"):
        try:
            return jsonable(float(value))
        except (TypeError, ValueError):
            pass
    return str(value)


class EventEmitter:
    """Writes events as JSON lines to one stream; ``batch`` events at most once per ``min_batch_interval_s``.

    Args:
        stream: where the lines go (the trainer passes the process's real stdout).
        min_batch_interval_s: minimum seconds between two ``batch`` events.
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        min_batch_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_batch_interval_s < 0:
            raise ValueError(f"Expected min_batch_interval_s >= 0. Received: {min_batch_interval_s}")
        self._stream = stream
        self._interval = min_batch_interval_s
        self._clock = clock
        self._last_batch: float | None = None
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event now and return the record written."""
        record = {"event": event, "time": round(time.time(), 3), **jsonable(fields)}
        line = json.dumps(record, allow_nan=False, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
            self.counts[event] = self.counts.get(event, 0) + 1
        return record

    def batch_due(self) -> bool:
        """Whether a ``batch`` event would go out now (lets callers skip computing its fields)."""
        return self._last_batch is None or self._clock() - self._last_batch >= self._interval

    def batch(self, **fields: Any) -> dict[str, Any] | None:
        """Emit a ``batch`` event unless one went out less than the interval ago; None when dropped."""
        now = self._clock()
        if self._last_batch is not None and now - self._last_batch < self._interval:
            return None
        self._last_batch = now
        return self.emit("batch", **fields)
