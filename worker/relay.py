"""A running job's events on their way out: to the job DB (the record), to Redis pub/sub (a wake-up call
for the API's event streams, ``service/streams.py``), and into the job's ``last_progress``.

Every trainer event (a JSON line on its stdout) is stored with a sequence number, then published on
``gpuyard:job:<id>:events``; a broken Redis costs live updates, never the job.
"""

from __future__ import annotations

import json
import logging
from typing import Any

try:  # optional: without Redis (bench/gpu_check.sh) events go to the job DB only
    import redis
except ImportError:  # pragma: no cover - redis-py is a dependency of the service
    redis = None  # type: ignore[assignment]  # the module stays importable; every use checks for None

log = logging.getLogger(__name__)

_CHANNEL_PREFIX = "gpuyard:job:"
_CHANNEL_SUFFIX = ":events"
#: What the API's event hub subscribes to: every job's channel.
EVENTS_PATTERN = f"{_CHANNEL_PREFIX}*{_CHANNEL_SUFFIX}"


def events_channel(job_id: str) -> str:
    """The Redis pub/sub channel carrying a job's events."""
    return f"{_CHANNEL_PREFIX}{job_id}{_CHANNEL_SUFFIX}"


def job_of_channel(channel: bytes | str) -> str | None:
    """The job id of an :func:`events_channel` name, or None for any other channel."""
    name = channel.decode() if isinstance(channel, bytes) else channel
    if name.startswith(_CHANNEL_PREFIX) and name.endswith(_CHANNEL_SUFFIX):
        return name[len(_CHANNEL_PREFIX) : -len(_CHANNEL_SUFFIX)] or None
    return None


class EventPublisher:
    """Publishes job events on Redis pub/sub; a broken Redis costs live updates, never the job."""

    def __init__(self, redis_url: str | None) -> None:
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
            if redis_url and redis is not None
            else None
        )
        self._warned = False

    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        if self._client is None:
            return
        try:
            self._client.publish(events_channel(job_id), json.dumps(payload, default=str))
        except Exception as exc:  # redis.RedisError and its kin: live updates are best effort
            if not self._warned:
                log.warning("job %s: cannot publish events to Redis (%s); the DB still gets them", job_id, exc)
                self._warned = True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def progress_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """The job's ``last_progress`` fields an event updates, or None for events that carry none."""
    kind = event.get("event")
    if kind == "epoch_end":
        keys = ("epoch", "epochs", "loss", "metrics", "samples_per_s", "eta_s")
        return {"stage": "training", **{k: event.get(k) for k in keys}, "step": None}
    if kind == "batch":
        keys = ("epoch", "step", "steps", "loss", "samples_per_s", "eta_s")
        return {"stage": "training", **{k: event[k] for k in keys if k in event}}
    if kind == "started":
        return {
            "stage": "started",
            "epochs": event.get("epochs"),
            "resumed_from_epoch": event.get("resumed_from_epoch"),
        }
    if kind == "finished":
        # Final metrics are nested by split (train/val/test); `metrics` stays the flat per-epoch figures.
        return {"stage": "finished", "final_metrics": event.get("metrics")}
    if kind == "health":  # the current findings (models/health.py): each event replaces the last
        return {"health": event.get("findings") or []}
    return None
