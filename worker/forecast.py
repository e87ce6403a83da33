"""Forecasting: when each waiting job would start, by replaying the placement rule (worker/placement.py) at
every running job's expected end, with durations learnt from the jobs that finished (``estimated_start_at``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.states import QUEUED, SUCCEEDED
from models.spec import resources_of
from store import Job
from worker.placement import GpuView, QueuedJob, Ticket, plan_dispatch


# ────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Holding:
    """An active job in a forecast: where it holds room and when it is expected to end."""

    ticket: Ticket
    end: dt.datetime


def forecast_starts(
    order: Sequence[Ticket],
    holding: Iterable[Holding],
    gpus: Sequence[GpuView],
    *,
    now: dt.datetime,
    duration_s: Callable[[Ticket], float],
    reorder: Callable[[list[Ticket], list[Ticket], dt.datetime], list[Ticket]] | None = None,
    **rule: Any,
) -> dict[str, dt.datetime | None]:
    """When each waiting job of ``order`` would start: :func:`plan_dispatch` replayed at every expected end.

    The running jobs end at their ``end``; a job placed at time ``t`` ends at ``t + duration_s(job)``.
    The order is kept as given (the order of ``now``; ``reorder`` may order the line again at each step),
    and GPUs keep their current state (an offline GPU
    stays offline), so a job that only such a GPU could run gets None. Each step looks at the first
    ``max(64, 4 × slots)`` jobs of the line only.

    Args:
        order: the waiting jobs in dispatch order.
        holding: the active jobs with their expected ends.
        gpus: the GPUs as they are now.
        now: the time of the forecast.
        duration_s: the expected run time of a job not started yet.
        reorder: puts the remaining jobs in dispatch order again at each step, given the active ones and the
            time (the fair order moves as jobs start and end); None keeps ``order``.
        rule: ``plan_dispatch``'s keyword arguments.
    """
    # Memory gpuyard's own jobs hold now is read from NVML; in the future only the budgets count.
    board = [dataclasses.replace(g, gpuyard_bytes=0) for g in gpus]
    active = [h if h.end > now else Holding(h.ticket, now) for h in holding]
    remaining = list(order)
    starts: dict[str, dt.datetime | None] = {}
    clock = now
    # Only the head of the line can start at the next end: at most every slot frees, and a job that waits
    # closes its GPUs to the jobs behind it; looking at a window keeps a long queue's forecast linear.
    window = max(64, 4 * sum(g.slots or 4 for g in board))
    while remaining:
        if reorder is not None and clock > now:
            remaining = reorder(remaining, [h.ticket for h in active], clock)
        plan = plan_dispatch(remaining[:window], [h.ticket for h in active], board, **rule)
        placed = {p.job_id: p.gpu for p in plan.placements}
        for ticket in remaining:
            if ticket.id in placed:
                starts[ticket.id] = clock
                end = clock + dt.timedelta(seconds=duration_s(ticket))
                active.append(Holding(dataclasses.replace(ticket, gpu=placed[ticket.id]), end))
        remaining = [t for t in remaining if t.id not in placed]
        if not remaining or not active:
            break
        clock = max(clock, min(h.end for h in active))
        active = [h for h in active if h.end > clock]
    starts.update({t.id: None for t in remaining})
    return starts


def job_kind(job: QueuedJob) -> tuple[int, str | None, str, int]:
    """What makes two jobs alike in run time: owner, data set, architecture family and epochs."""
    spec = job.spec or {}
    arch = spec.get("architecture") or {}
    epochs = (spec.get("training") or {}).get("epochs") or 0
    return (job.owner_id, job.dataset_id, str(arch.get("family")), int(epochs))


class Durations:
    """Expected run times from the jobs that succeeded lately: the median of the same :func:`job_kind`,
    else of anyone's jobs of the same architecture family and epochs, else of the same owner, else of
    everyone, else ``default_s``."""

    def __init__(self, finished: Iterable[Job], default_s: float) -> None:
        self.default_s = default_s
        self._kind: dict[tuple[int, str | None, str, int], list[float]] = defaultdict(list)
        self._shape: dict[tuple[str, int], list[float]] = defaultdict(list)
        self._owner: dict[int, list[float]] = defaultdict(list)
        self._all: list[float] = []
        for job in finished:
            if job.state != SUCCEEDED or job.started_at is None or job.finished_at is None:
                continue
            seconds = (job.finished_at - job.started_at).total_seconds()
            kind = job_kind(job)
            self._kind[kind].append(seconds)
            self._shape[kind[2:]].append(seconds)
            self._owner[job.owner_id].append(seconds)
            self._all.append(seconds)

    def of(self, job: QueuedJob) -> float:
        kind = job_kind(job)
        samples = (self._kind.get(kind), self._shape.get(kind[2:]), self._owner.get(job.owner_id), self._all)
        for sample in samples:
            if sample:
                return max(1.0, statistics.median(sample))
        limit = resources_of(job.spec).max_runtime_s
        return float(min(self.default_s, limit) if limit else self.default_s)

    def remaining(self, job: Job, now: dt.datetime) -> float:
        """Seconds until an active job ends: the trainer's ETA while it trains, else expected − elapsed."""
        progress = job.last_progress or {}
        eta = progress.get("eta_s")
        if job.state != QUEUED and isinstance(eta, int | float) and eta >= 0:
            return float(eta)
        expected = self.of(job)
        if job.state == QUEUED or job.started_at is None:
            return expected
        elapsed = (now - job.started_at).total_seconds()
        return max(expected - elapsed, 0.1 * expected)

