"""What ``GET /metrics`` reads of the store."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select

from core.states import (
    QUEUED,
    RUNNING,
    TERMINAL_STATES,
)
from store.base import StoreBase
from store.tables import (
    Job,
)


@dataclass
class MetricsSnapshot:
    """What ``GET /metrics`` reports of the job DB (:meth:`Database.metrics_snapshot`)."""

    by_state: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    waits: list[float] = field(default_factory=list)
    durations: dict[str, list[float]] = field(default_factory=dict)
    samples_per_s: dict[str, float] = field(default_factory=dict)
    running_by_gpu: dict[str, int] = field(default_factory=dict)


class MetricsStore(StoreBase):
    """One snapshot per scrape."""

    # ── metrics ──
    def metrics_snapshot(self, since: dt.datetime) -> MetricsSnapshot:
        """Jobs by state, the queue, and the waits and durations of jobs started or ended after ``since``."""
        snap = MetricsSnapshot()
        with self._begin() as s:
            for state, count in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                snap.by_state[state] = int(count)
            snap.waiting = int(
                s.scalar(select(func.count()).where(Job.state == QUEUED, Job.dispatched_at.is_(None))) or 0
            )
            recent = s.execute(
                select(
                    Job.id, Job.state, Job.gpu, Job.queued_at, Job.started_at, Job.finished_at, Job.last_progress
                ).where(or_(Job.state == RUNNING, Job.started_at >= since, Job.finished_at >= since))
            ).all()
        for job_id, state, gpu, queued_at, started_at, finished_at, progress in recent:
            if started_at is not None and started_at >= since:
                snap.waits.append(max(0.0, (started_at - queued_at).total_seconds()))
            if state in TERMINAL_STATES and started_at is not None and finished_at is not None and finished_at >= since:
                snap.durations.setdefault(state, []).append(max(0.0, (finished_at - started_at).total_seconds()))
            if state == RUNNING:
                snap.running_by_gpu[gpu or "cpu"] = snap.running_by_gpu.get(gpu or "cpu", 0) + 1
                rate = (progress or {}).get("samples_per_s")
                if isinstance(rate, int | float):
                    snap.samples_per_s[job_id] = float(rate)
        return snap
