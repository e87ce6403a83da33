"""GPUs: registration, draining, quarantine and what runs on each."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, select, update

from core.states import (
    QUEUED,
    RUNNING,
)
from store.base import StoreBase, rowcount
from store.tables import (
    Gpu,
    Job,
    utcnow,
)


class GpusStore(StoreBase):
    """The GPU inventory the workers register."""

    # ── GPUs ──
    def register_gpu(
        self,
        uuid: str,
        *,
        host: str,
        index: int,
        name: str,
        memory_total_bytes: int,
        backends: Sequence[str] | None = None,
        now: dt.datetime | None = None,
    ) -> Gpu:
        """Record (or refresh) a GPU a worker serves, with the backends it runs; drain and quarantine stay."""
        now = now or utcnow()
        values: dict[str, Any] = {"host": host, "index": index, "name": name, "memory_total_bytes": memory_total_bytes}
        if backends is not None:
            values["backends"] = sorted(backends)
        with self._begin() as s:
            changed = rowcount(s.execute(
                update(Gpu).where(Gpu.uuid == uuid).values(**values).execution_options(synchronize_session=False)
            ))
            if changed != 1:
                s.add(Gpu(uuid=uuid, registered_at=now, draining=False, quarantined=False, **values))
                s.flush()
            gpu = s.get(Gpu, uuid, populate_existing=True)
            assert gpu is not None
            return gpu

    def get_gpu(self, uuid: str) -> Gpu | None:
        with self._begin() as s:
            return s.get(Gpu, uuid)

    def list_gpus(self) -> list[Gpu]:
        """Every registered GPU, by host then NVML index."""
        with self._begin() as s:
            return list(s.scalars(select(Gpu).order_by(Gpu.host, Gpu.index, Gpu.uuid)))

    def set_gpu_draining(
        self, uuid: str, draining: bool, *, by: str | None = None, now: dt.datetime | None = None
    ) -> Gpu | None:
        """Start or stop draining a GPU (its running jobs finish; no new job is placed on it)."""
        now = now or utcnow()
        values = {"draining": True, "draining_since": now, "draining_by": by} if draining else {
            "draining": False, "draining_since": None, "draining_by": None}  # fmt: skip
        with self._begin() as s:
            s.execute(update(Gpu).where(Gpu.uuid == uuid).values(**values).execution_options(synchronize_session=False))
            return s.get(Gpu, uuid, populate_existing=True)

    def quarantine_gpu(self, uuid: str, reason: str, *, now: dt.datetime | None = None) -> Gpu | None:
        """Keep new jobs off a GPU that failed its hygiene check, until an admin clears it.

        A GPU already quarantined keeps its first reason and time.
        """
        now = now or utcnow()
        with self._begin() as s:
            s.execute(
                update(Gpu)
                .where(Gpu.uuid == uuid, Gpu.quarantined.is_(False))
                .values(quarantined=True, quarantined_since=now, quarantine_reason=reason[:2000])
                .execution_options(synchronize_session=False)
            )
            return s.get(Gpu, uuid, populate_existing=True)

    def clear_gpu_quarantine(self, uuid: str) -> Gpu | None:
        with self._begin() as s:
            s.execute(
                update(Gpu)
                .where(Gpu.uuid == uuid)
                .values(quarantined=False, quarantined_since=None, quarantine_reason=None)
                .execution_options(synchronize_session=False)
            )
            return s.get(Gpu, uuid, populate_existing=True)

    def jobs_on_gpu(self, uuid: str) -> list[Job]:
        """Running and dispatched jobs on a GPU."""
        with self._begin() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(
                        Job.gpu == uuid,
                        or_(Job.state == RUNNING, and_(Job.state == QUEUED, Job.dispatched_at.is_not(None))),
                    )
                    .order_by(Job.started_at, Job.id)
                ).unique()
            )
