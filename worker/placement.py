"""Placement: which waiting job goes on which GPU, and why the others wait (pure; worker/dispatch.py applies it).

The rule (``plan_dispatch``, a pure function) for a GPU job of memory fraction ``f`` on GPU ``g``:

* ``g`` is online (a live heartbeat), not draining, not quarantined, and has a free worker slot;
* fractions: ``f`` + the fractions of ``g``'s running and dispatched jobs ≤ ``1 − gpu_reserve_fraction``;
* memory: ``need(f) = min(total, f × total + allowance)`` fits in ``total − foreign − committed``, where
  ``foreign`` is the memory of processes on ``g`` that gpuyard did not start (NVML or fake readings) and
  ``committed`` the larger of the needs of ``g``'s gpuyard jobs and what they hold now;
* the owner's running + dispatched fractions plus ``f`` ≤ ``max_gpu_fraction_per_user``.

Among the GPUs that fit: best fit, the one left with the least free fraction (then memory, then index).

* the job's ``resources.backend`` is one the GPU's worker reported it can run (heartbeat ``backends``).

Order and fairness: :func:`worker.fairshare.fair_order` (priority raised by waiting, then each user's
share of the GPUs held now and lately, then FIFO). A job that fits nowhere waits at the head of its GPUs:
every GPU it could use is closed to later jobs in this pass, so a stream of small jobs never starves a big
one. Later jobs may still start on GPUs the blocked job cannot use (another uuid, a drained GPU). A job
held back only by its owner's cap blocks nobody.

Why a job waits is a ``waiting_reason`` code (:data:`WAITING_REASONS`) with a sentence naming the numbers
(``dispatch_note``). worker/forecast.py replays this rule to estimate when each waiting job starts.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import Problem
from core.settings import Settings
from models.spec import resources_of
from store import Database, Gpu
from worker.gpus import budget_bytes
from worker.heartbeat import HeartbeatSource
from worker.queues import gpu_queue

_EPS = 1e-9

# Why a job waits (``waiting_reason``); each comes with a sentence (``dispatch_note``) naming the numbers.
GPU_FULL = "gpu_full"
BEHIND_EARLIER_JOB = "behind_earlier_job"
USER_FRACTION_CAP = "user_fraction_cap"
GPU_DRAINING = "gpu_draining"
GPU_OFFLINE = "gpu_offline"
UNKNOWN_GPU = "unknown_gpu"
NO_WORKER_FOR_BACKEND = "no_worker_for_backend"
QUEUE_UNREACHABLE = "queue_unreachable"
OVER_QUOTA = "over_quota"
# These two are followed by job ids in ``waiting_reason``: "preempting job_a, job_b", "preempted_by job_c".
PREEMPTING = "preempting"
PREEMPTED_BY = "preempted_by"
WAITING_REASONS: dict[str, str] = {
    GPU_FULL: "every GPU it may use is online but has no room (memory fraction, free memory or slots) now",
    BEHIND_EARLIER_JOB: "an earlier job waits for the same GPUs and is not overtaken there",
    USER_FRACTION_CAP: "its owner's running jobs already hold max_gpu_fraction_per_user",
    GPU_DRAINING: "the GPUs it may use are draining or quarantined",
    GPU_OFFLINE: "the GPUs it may use have no live worker",
    UNKNOWN_GPU: "the GPU it names is not registered by any worker",
    NO_WORKER_FOR_BACKEND: "no online worker can run its resources.backend",
    QUEUE_UNREACHABLE: "its task could not be sent to the job queue; the next pass tries again",
    OVER_QUOTA: "its owner used their GPU-hour quota: it runs only on room nobody else is waiting for",
    PREEMPTING: "lower-priority jobs are stopping (checkpointing) to make room for it; it starts next",
    PREEMPTED_BY: "it was stopped (checkpointed) for a higher-priority job and resumes when room frees",
}


# ── what the dispatcher sees ──────────────────────────────────────────────────────────────────────────
@dataclass
class GpuView:
    """One registered GPU as the dispatcher and GET /v1/gpus see it: DB row + latest heartbeat."""

    uuid: str
    host: str
    index: int
    name: str
    memory_total_bytes: int
    online: bool = False
    draining: bool = False
    quarantined: bool = False
    slots: int | None = None
    memory_used_bytes: int | None = None
    utilization_percent: int | None = None
    foreign_bytes: int = 0
    gpuyard_bytes: int = 0
    processes: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_at: float | None = None
    backends: tuple[str, ...] | None = None  # what its worker can run; None: not reported (any)
    row: Gpu | None = None

    def runs(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    @property
    def placeable(self) -> bool:
        return self.online and not self.draining and not self.quarantined

    @property
    def state(self) -> str:
        if self.quarantined:
            return "quarantined"
        if self.draining:
            return "draining"
        return "online" if self.online else "offline"

    @classmethod
    def of(cls, row: Gpu, heartbeat: dict[str, Any] | None) -> GpuView:
        view = cls(
            uuid=row.uuid,
            host=row.host,
            index=row.index,
            name=row.name,
            memory_total_bytes=row.memory_total_bytes,
            draining=row.draining,
            quarantined=row.quarantined,
            row=row,
        )
        if heartbeat:
            view.online = True
            view.host = heartbeat.get("host", view.host)
            view.slots = heartbeat.get("slots")
            view.memory_total_bytes = int(heartbeat.get("memory_total_bytes") or view.memory_total_bytes)
            view.memory_used_bytes = heartbeat.get("memory_used_bytes")
            view.utilization_percent = heartbeat.get("utilization_percent")
            view.foreign_bytes = int(heartbeat.get("foreign_bytes") or 0)
            view.gpuyard_bytes = int(heartbeat.get("gpuyard_bytes") or 0)
            view.processes = list(heartbeat.get("processes") or [])
            view.heartbeat_at = heartbeat.get("time")
            reported = heartbeat.get("backends")
            view.backends = tuple(reported) if isinstance(reported, list) else None
        return view


class QueuedJob(Protocol):
    """What placement and the forecast read of a waiting job: a stored Job, or a job not submitted yet
    (``worker.submit.Proposal``, a dry run's: no row is written)."""

    @property
    def id(self) -> str: ...
    @property
    def owner_id(self) -> int: ...
    @property
    def dataset_id(self) -> str | None: ...
    @property
    def spec(self) -> dict[str, Any]: ...
    @property
    def gpu(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def queued_at(self) -> dt.datetime: ...
    @property
    def preempted_by(self) -> str | None: ...  # the job it was preempted by, while it waits to resume


@dataclass(frozen=True)
class Ticket:
    """What placement needs to know of a job."""

    id: str
    owner_id: int
    fraction: float
    request: str  # "any" | "cpu" | a GPU UUID
    gpu: str | None = None  # where it runs or was dispatched (active jobs)
    backend: str = "tensorflow"
    priority: int = 0
    queued_at: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

    @classmethod
    def of(cls, job: QueuedJob) -> Ticket:
        resources = resources_of(job.spec)
        return cls(
            job.id,
            job.owner_id,
            resources.fraction,
            resources.gpu,
            job.gpu,
            resources.backend,
            job.priority,
            job.queued_at,
        )


# ── the rule ──────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Placement:
    job_id: str
    gpu: str  # a UUID, or "cpu"
    queue: str


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # job id → why it waits, a sentence
    reasons: dict[str, str] = field(default_factory=dict)  # job id → why it waits, a WAITING_REASONS code

    def wait(self, job_id: str, reason: str, note: str) -> None:
        self.reasons[job_id], self.notes[job_id] = reason, note


@dataclass
class Load:
    """What one GPU holds in a pass: its jobs' fractions, memory needs and count."""

    fraction: float = 0.0
    need: int = 0
    jobs: int = 0


def plan_dispatch(
    queued: Sequence[Ticket],
    active: Iterable[Ticket],
    gpus: Sequence[GpuView],
    *,
    cpu_queue: str,
    reserve: float = 0.0,
    allowance: int = 0,
    user_cap: float = float("inf"),
) -> Plan:
    """Decide where the ``queued`` jobs (in dispatch order) go, given the ``active`` ones (running or
    dispatched) and the GPUs. Pure: the caller marks and sends. See the module docstring for the rule."""
    by_uuid = {g.uuid: g for g in gpus}
    load: dict[str, Load] = defaultdict(Load)
    user_share: dict[int, float] = defaultdict(float)
    for ticket in active:
        if ticket.gpu and ticket.gpu in by_uuid:
            entry = load[ticket.gpu]
            entry.fraction += ticket.fraction
            entry.need += budget_bytes(ticket.fraction, by_uuid[ticket.gpu].memory_total_bytes, allowance)
            entry.jobs += 1
        if ticket.gpu and ticket.gpu != "cpu":
            user_share[ticket.owner_id] += ticket.fraction
    plan = Plan()
    closed: set[str] = set()  # GPUs an earlier waiting job is first in line for
    for ticket in queued:
        if ticket.request == "cpu" or (not gpus and ticket.request == "any"):
            plan.placements.append(Placement(ticket.id, "cpu", cpu_queue))
            continue
        if ticket.request != "any" and ticket.request not in by_uuid:
            plan.wait(ticket.id, UNKNOWN_GPU, f"waiting: GPU {ticket.request} is not registered by any worker")
            continue
        if user_share[ticket.owner_id] + ticket.fraction > user_cap + _EPS:
            plan.wait(
                ticket.id,
                USER_FRACTION_CAP,
                f"waiting: your running jobs hold {user_share[ticket.owner_id]:.2f} GPU; the limit per user "
                f"is {user_cap:g} (max_gpu_fraction_per_user)",
            )
            continue
        wanted = [g for g in gpus if ticket.request in ("any", g.uuid)]
        candidates = [g for g in wanted if g.placeable and g.runs(ticket.backend)]
        open_gpus = [g for g in candidates if g.uuid not in closed]
        fitting = [g for g in open_gpus if fits_on(g, load[g.uuid], ticket, reserve, allowance)]
        if fitting:
            best = min(fitting, key=lambda g: _leftover(g, load[g.uuid], ticket, reserve, allowance))
            entry = load[best.uuid]
            entry.fraction += ticket.fraction
            entry.need += budget_bytes(ticket.fraction, best.memory_total_bytes, allowance)
            entry.jobs += 1
            user_share[ticket.owner_id] += ticket.fraction
            plan.placements.append(Placement(ticket.id, best.uuid, gpu_queue(best.uuid)))
            continue
        plan.wait(ticket.id, *_why_waiting(ticket, wanted, candidates, closed, load, reserve, allowance))
        closed.update(g.uuid for g in candidates)  # no later job overtakes it on these GPUs
    return plan


def _free_fraction(gpu: GpuView, entry: Load, reserve: float) -> float:
    return 1.0 - reserve - entry.fraction


def _free_memory(gpu: GpuView, entry: Load) -> int:
    return gpu.memory_total_bytes - gpu.foreign_bytes - max(entry.need, gpu.gpuyard_bytes)


def fits_on(gpu: GpuView, entry: Load, ticket: Ticket, reserve: float, allowance: int) -> bool:
    if gpu.slots is not None and entry.jobs >= gpu.slots:
        return False
    if ticket.fraction > _free_fraction(gpu, entry, reserve) + _EPS:
        return False
    return budget_bytes(ticket.fraction, gpu.memory_total_bytes, allowance) <= _free_memory(gpu, entry)


def _leftover(gpu: GpuView, entry: Load, ticket: Ticket, reserve: float, allowance: int) -> tuple[float, int, int]:
    need = budget_bytes(ticket.fraction, gpu.memory_total_bytes, allowance)
    return (_free_fraction(gpu, entry, reserve) - ticket.fraction, _free_memory(gpu, entry) - need, gpu.index)


def _why_waiting(
    ticket: Ticket,
    wanted: list[GpuView],
    candidates: list[GpuView],
    closed: set[str],
    load: dict[str, Load],
    reserve: float,
    allowance: int,
) -> tuple[str, str]:
    if not candidates:
        states = ", ".join(f"{g.index}:{g.state}" for g in wanted) or "none registered"
        if any(g.placeable for g in wanted):
            able = sorted({b for g in wanted if g.placeable for b in (g.backends or ())})
            return NO_WORKER_FOR_BACKEND, (
                f"waiting: no online worker runs backend {ticket.backend!r} (online workers run: "
                f"{', '.join(able) or 'none'})"
            )
        if any(g.online and (g.draining or g.quarantined) for g in wanted):
            return GPU_DRAINING, f"waiting: no GPU can take new jobs ({states})"
        return GPU_OFFLINE, f"waiting: no GPU can take new jobs ({states})"
    if all(g.uuid in closed for g in candidates):
        return BEHIND_EARLIER_JOB, "waiting: behind an earlier job that is waiting for the same GPUs"
    parts = []
    for g in candidates:
        entry = load[g.uuid]
        if g.slots is not None and entry.jobs >= g.slots:
            parts.append(f"GPU {g.index}: all {g.slots} slots busy")
        elif ticket.fraction > _free_fraction(g, entry, reserve) + _EPS:
            parts.append(
                f"GPU {g.index}: {max(0.0, _free_fraction(g, entry, reserve)):.2f} of its memory fraction free"
            )
        else:
            need = budget_bytes(ticket.fraction, g.memory_total_bytes, allowance)
            parts.append(
                f"GPU {g.index}: {max(0, _free_memory(g, entry)) / 2**30:.1f} GiB free of {need / 2**30:.1f} needed"
            )
    return GPU_FULL, f"waiting for room (memory_fraction {ticket.fraction:g}): " + "; ".join(parts)


# ── refusing what can never run ───────────────────────────────────────────────────────────────────────
def never_fits(spec: dict[str, Any], gpus: Sequence[GpuView], settings: Settings) -> list[Problem]:
    """Why a job could never be placed, whatever finishes (empty when it could). Checked at submit.

    A named GPU must be registered; the fraction must fit ``1 − reserve`` and the per-user cap. (Memory
    never refuses: a job's need is capped at its GPU's total, so an empty GPU always holds it.)
    """
    resources = resources_of(spec)
    fraction, request = resources.fraction, resources.gpu
    if request == "cpu" or (request == "any" and not gpus):
        return []
    if request != "any" and request not in {g.uuid for g in gpus}:
        known = ", ".join(g.uuid for g in gpus) or "none"
        return [
            Problem(
                "unknown_gpu",
                f"resources.gpu: no worker serves GPU {request}. Expected 'any', 'cpu' or one of: {known}",
                "resources.gpu",
            )
        ]
    problems = []
    limit = 1.0 - settings.gpu_reserve_fraction
    if fraction > limit + _EPS:
        problems.append(
            Problem(
                "never_fits",
                f"resources.memory_fraction: {fraction:g} can never be placed; a GPU's jobs share at most "
                f"{limit:g} of it (gpu_reserve_fraction={settings.gpu_reserve_fraction:g})",
                "resources.memory_fraction",
            )
        )
    elif fraction > settings.max_gpu_fraction_per_user + _EPS:
        problems.append(
            Problem(
                "never_fits",
                f"resources.memory_fraction: {fraction:g} exceeds the per-user limit of "
                f"{settings.max_gpu_fraction_per_user:g} GPU (max_gpu_fraction_per_user)",
                "resources.memory_fraction",
            )
        )
    return problems


def gpu_views(db: Database, heartbeats: HeartbeatSource) -> list[GpuView]:
    """Every registered GPU with its latest heartbeat (offline when it has none)."""
    rows = db.list_gpus()
    beats = heartbeats([r.uuid for r in rows]) if rows else {}
    return [GpuView.of(row, beats.get(row.uuid)) for row in rows]

