"""GPU heartbeats, written, keyed and read in one place: what tells the dispatcher which GPUs are online.

The fleet (worker/fleet.py) builds one record per GPU every ``gpu_heartbeat_s`` with :func:`heartbeat` and
stores it with :func:`publish` under :func:`heartbeat_key` (``gpuyard:gpu:<uuid>``, JSON) with a TTL of
``gpu_heartbeat_ttl_s``; :func:`withdraw` takes them away when the fleet stops. The dispatcher, the API
and the metrics read them with :class:`GpuBoard` (or any :data:`HeartbeatSource`: tests pass a dict).
No heartbeat → the GPU is offline and gets no new jobs.

A record: ``uuid index name pci_bus_id host worker slots backends memory_total_bytes memory_used_bytes
memory_free_bytes utilization_percent processes gpuyard_bytes foreign_bytes time``; each process
``{pid, pgid, memory_bytes, gpuyard}`` (gpuyard: a descendant of that GPU's worker).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis

from worker.gpus import GpuInfo

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "gpuyard:gpu:"

#: Who reads heartbeats: GPU uuids → their latest records (absent: offline).
HeartbeatSource = Callable[[Sequence[str]], dict[str, dict[str, Any]]]


def heartbeat_key(gpu_uuid: str) -> str:
    """The Redis key holding a GPU's latest heartbeat (JSON, with a TTL)."""
    return HEARTBEAT_PREFIX + gpu_uuid


def heartbeat(
    info: GpuInfo, *, host: str, worker: str, slots: int, ours: set[int], backends: Sequence[str] = ()
) -> dict[str, Any]:
    """One GPU's heartbeat: its readings, with each process marked gpuyard's (in ``ours``) or foreign, and
    the backends its trainers can run."""
    processes: list[dict[str, Any]] = [
        {"pid": p.pid, "pgid": _pgid(p.pid), "memory_bytes": p.memory_bytes, "gpuyard": p.pid in ours}
        for p in info.processes
    ]
    gpuyard_bytes = sum(p["memory_bytes"] for p in processes if p["gpuyard"])
    return {
        "uuid": info.uuid,
        "index": info.index,
        "name": info.name,
        "pci_bus_id": info.pci_bus_id,
        "host": host,
        "worker": worker,
        "slots": slots,
        "backends": list(backends),
        "memory_total_bytes": info.memory_total_bytes,
        "memory_used_bytes": info.memory_used_bytes,
        "memory_free_bytes": info.memory_free_bytes,
        "utilization_percent": info.utilization_percent,
        "processes": processes,
        "gpuyard_bytes": gpuyard_bytes,
        "foreign_bytes": sum(p["memory_bytes"] for p in processes if not p["gpuyard"]),
        "time": time.time(),
    }


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def publish(pipe: redis.client.Pipeline, record: dict[str, Any], ttl_s: float) -> None:
    """Queue one GPU's record on a Redis pipeline, under its key, expiring after ``ttl_s``."""
    pipe.set(heartbeat_key(record["uuid"]), json.dumps(record), px=max(1, int(ttl_s * 1000)))


def withdraw(client: redis.Redis, uuids: Iterable[str]) -> None:
    """Take these GPUs' heartbeats away now (offline at once rather than at the TTL)."""
    keys = [heartbeat_key(uuid) for uuid in uuids]
    if keys:
        client.delete(*keys)


class GpuBoard:
    """Reads the workers' GPU heartbeats from Redis; an unreachable Redis reads as every GPU offline."""

    def __init__(self, redis_url: str | None) -> None:
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) if redis_url else None
        )
        self._warned = False

    def heartbeats(self, uuids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if self._client is None or not uuids:
            return {}
        try:
            raw = self._client.mget([heartbeat_key(u) for u in uuids])
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("GPU heartbeats unreadable (%s): every GPU counts as offline", exc)
                self._warned = True
            return {}
        self._warned = False
        found = {}
        for uuid, value in zip(uuids, raw, strict=True):
            if value:
                try:
                    found[uuid] = json.loads(value)
                except ValueError:
                    continue
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
