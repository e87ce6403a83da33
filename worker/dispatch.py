"""Placement: which queued job goes to which GPU, decided under a DB lock, then sent to ``gpu.<uuid>``.

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

The queue explains itself: each pass stores on every waiting job its ``queue_position``, a
``waiting_reason`` code (:data:`WAITING_REASONS`) with a sentence (``dispatch_note``), and
``estimated_start_at`` from :func:`forecast_starts`, a replay of this same rule over the running jobs'
expected ends and the durations of the jobs ahead; a change is recorded as a ``queue`` event.

CPU jobs (``resources.gpu: cpu``, or any job when no GPU was ever registered) go to ``train_queue`` at once.

Two dispatchers never overcommit: read, decide and mark run in one transaction holding the dispatch
lock (``Database.dispatch_lock``). The job is marked (``gpu``, ``dispatched_at``) before its task is
sent; a send that fails takes the mark back. Dispatch runs on submit (the API), when a job ends (the
supervisor) and every janitor pass.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import Problem
from core.settings import Settings
from core.states import QUEUED, RUNNING, SUCCEEDED
from models.spec import resources_of
from store import Database, DispatchTxn, Gpu, Job, utcnow
from worker.fairshare import FairPolicy, UsageSpan, decayed_usage, fair_order
from worker.gpus import budget_bytes, context_allowance_bytes
from worker.heartbeat import GpuBoard, HeartbeatSource
from worker.preemption import Claimant, Holder, Preemption, PreemptPolicy, plan_preemption
from worker.queues import Sender, cpu_queue, gpu_queue
from worker.relay import EventPublisher

log = logging.getLogger(__name__)

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
class _Load:
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
    load: dict[str, _Load] = defaultdict(_Load)
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
        fitting = [g for g in candidates if g.uuid not in closed and _fits(g, load[g.uuid], ticket, reserve, allowance)]
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


def _free_fraction(gpu: GpuView, entry: _Load, reserve: float) -> float:
    return 1.0 - reserve - entry.fraction


def _free_memory(gpu: GpuView, entry: _Load) -> int:
    return gpu.memory_total_bytes - gpu.foreign_bytes - max(entry.need, gpu.gpuyard_bytes)


def _fits(gpu: GpuView, entry: _Load, ticket: Ticket, reserve: float, allowance: int) -> bool:
    if gpu.slots is not None and entry.jobs >= gpu.slots:
        return False
    if ticket.fraction > _free_fraction(gpu, entry, reserve) + _EPS:
        return False
    return budget_bytes(ticket.fraction, gpu.memory_total_bytes, allowance) <= _free_memory(gpu, entry)


def _leftover(gpu: GpuView, entry: _Load, ticket: Ticket, reserve: float, allowance: int) -> tuple[float, int, int]:
    need = budget_bytes(ticket.fraction, gpu.memory_total_bytes, allowance)
    return (_free_fraction(gpu, entry, reserve) - ticket.fraction, _free_memory(gpu, entry) - need, gpu.index)


def _why_waiting(
    ticket: Ticket,
    wanted: list[GpuView],
    candidates: list[GpuView],
    closed: set[str],
    load: dict[str, _Load],
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


# ── forecasting ───────────────────────────────────────────────────────────────────────────────────────
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


def _usage_spans(finished: Iterable[Job], active: Iterable[Job]) -> Iterator[UsageSpan]:
    for job in (*finished, *active):
        if job.gpu in (None, "cpu") or job.started_at is None or job.state == QUEUED:
            continue
        yield UsageSpan(job.owner_id, resources_of(job.spec).fraction, job.started_at, job.finished_at)


# ── doing it ──────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class DispatchReport:
    sent: list[Placement] = field(default_factory=list)
    failed: list[tuple[Placement, Exception]] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    starts: dict[str, dt.datetime | None] = field(default_factory=dict)  # waiting job → estimated start


@dataclass
class QueuePass:
    """One pass's decisions (:func:`decide_queue`): where jobs go now, and where the rest stand."""

    order: list[Ticket]
    plan: Plan
    starts: dict[str, dt.datetime | None]
    durations: Durations
    placed: list[Job] = field(default_factory=list)  # the jobs holding room when the pass began
    rule: dict[str, Any] = field(default_factory=dict)  # plan_dispatch's keyword arguments


def decide_queue(
    txn: DispatchTxn,
    settings: Settings,
    gpus: Sequence[GpuView],
    now: dt.datetime,
    *,
    extra: QueuedJob | None = None,
    over_quota: frozenset[int] = frozenset(),
) -> QueuePass:
    """Order the waiting jobs (fair share), place what fits, and forecast the others' starts.

    Args:
        extra: a job not in the database, considered as if it had been submitted at ``now`` (a dry run).
        over_quota: the users over their GPU-hour quota: their jobs go after everyone else's, so they run
            only on room nobody else waits for.
    """
    policy = FairPolicy(settings.fair_share_half_life_s, settings.queue_aging_s)
    waiting: list[QueuedJob] = [*txn.waiting(), *([extra] if extra is not None else [])]
    placed = txn.placed()
    finished = txn.finished_since(now - dt.timedelta(seconds=5 * policy.half_life_s))
    by_id = {j.id: j for j in waiting}
    active = [Ticket.of(j) for j in placed]
    held: dict[int, float] = defaultdict(float)
    for ticket in active:
        if ticket.gpu not in (None, "cpu"):
            held[ticket.owner_id] += ticket.fraction
    usage = decayed_usage(_usage_spans(finished, placed), now, policy.half_life_s)
    order = fair_order([Ticket.of(j) for j in waiting], held=held, usage=usage, now=now, policy=policy)
    order = [t for t in order if t.owner_id not in over_quota] + [t for t in order if t.owner_id in over_quota]
    rule: dict[str, Any] = {
        "cpu_queue": cpu_queue(settings),
        "reserve": settings.gpu_reserve_fraction,
        "allowance": context_allowance_bytes(settings),
        "user_cap": settings.max_gpu_fraction_per_user,
    }
    plan = plan_dispatch(order, active, gpus, **rule)
    _explain_quota_and_preemption(plan, order, by_id, placed, over_quota)
    durations = Durations(finished, settings.queue_default_job_s)
    going = {p.job_id: p.gpu for p in plan.placements}
    holding = [Holding(Ticket.of(j), now + dt.timedelta(seconds=durations.remaining(j, now))) for j in placed]
    holding += [
        Holding(dataclasses.replace(t, gpu=going[t.id]), now + dt.timedelta(seconds=durations.of(by_id[t.id])))
        for t in order
        if t.id in going
    ]

    starts = forecast_starts(
        [t for t in order if t.id in plan.notes],
        holding,
        gpus,
        now=now,
        duration_s=lambda t: durations.of(by_id[t.id]),
        **rule,
    )
    return QueuePass(order, plan, starts, durations, placed, rule)


def _explain_quota_and_preemption(
    plan: Plan,
    order: Sequence[Ticket],
    waiting: dict[str, QueuedJob],
    placed: Sequence[Job],
    over_quota: frozenset[int],
) -> None:
    """Name the waiting reasons the placement rule does not know: a preemption under way for the job
    (``preempting``), the job preempted and back in line (``preempted_by``), its owner over quota while
    others wait (``over_quota``)."""
    stopping: dict[str, list[str]] = defaultdict(list)
    for holder in placed:
        if holder.state == RUNNING and holder.preempted_by:
            stopping[holder.preempted_by].append(holder.id)
    others_wait = any(t.owner_id not in over_quota for t in order if t.id in plan.reasons)
    for ticket in order:
        if ticket.id not in plan.reasons or plan.reasons[ticket.id] not in (GPU_FULL, BEHIND_EARLIER_JOB):
            continue
        job = waiting[ticket.id]
        if ticket.id in stopping:
            victims = ", ".join(sorted(stopping[ticket.id]))
            plan.wait(
                ticket.id, f"{PREEMPTING} {victims}", f"waiting: {victims} checkpoint to make room; it starts next"
            )
        elif ticket.owner_id in over_quota and others_wait:
            plan.wait(
                ticket.id,
                OVER_QUOTA,
                "waiting: your GPU-hour quota is used up; your jobs run only on room nobody else is waiting for",
            )
        elif job.preempted_by:
            plan.wait(
                ticket.id,
                f"{PREEMPTED_BY} {job.preempted_by}",
                f"waiting: preempted by {job.preempted_by}; it resumes from its checkpoint when room frees",
            )


def choose_preemption(
    decided: QueuePass, gpus: Sequence[GpuView], settings: Settings, now: dt.datetime, over_quota: frozenset[int]
) -> Preemption | None:
    """The pass's preemption (:func:`worker.preemption.plan_preemption`) over what :func:`decide_queue` saw."""
    policy = PreemptPolicy(settings.preemption, settings.preempt_after_s, settings.preempt_min_run_s)
    if not policy.enabled:
        return None
    by_uuid = {g.uuid: g for g in gpus}
    tickets = {t.id: t for t in decided.order}
    claimants = [
        Claimant(
            t.id,
            t.priority,
            t.queued_at,
            tuple(g.uuid for g in gpus if t.request in ("any", g.uuid) and g.placeable and g.runs(t.backend)),
            t.owner_id in over_quota,
        )
        for t in decided.order
        if decided.plan.reasons.get(t.id) == GPU_FULL
    ]
    if not claimants:
        return None
    holders = [
        Holder(
            j.id,
            j.gpu or "",
            j.priority,
            j.started_at if j.state == RUNNING else None,
            resources_of(j.spec).preemptible,
            j.preempted_at,
            j.state == RUNNING and j.preempted_by is not None,
            float((j.last_progress or {}).get("step") or 0),
            j.owner_id in over_quota,
        )
        for j in decided.placed
        if j.gpu not in (None, "cpu")
    ]
    going = {p.job_id: p.gpu for p in decided.plan.placements}
    holding = [Ticket.of(j) for j in decided.placed]
    holding += [dataclasses.replace(tickets[i], gpu=g) for i, g in going.items() if i in tickets]
    rule = decided.rule

    def fits(claimant: Claimant, gpu: str, without: frozenset[str]) -> bool:
        load = _Load()
        for ticket in holding:
            if ticket.gpu == gpu and ticket.id not in without:
                load.fraction += ticket.fraction
                load.need += budget_bytes(ticket.fraction, by_uuid[gpu].memory_total_bytes, rule["allowance"])
                load.jobs += 1
        # What gpuyard's jobs hold now is read from NVML; the stopped victims' share of it will be released.
        board = dataclasses.replace(by_uuid[gpu], gpuyard_bytes=0)
        return _fits(board, load, tickets[claimant.id], rule["reserve"], rule["allowance"])

    return plan_preemption(claimants, holders, fits=fits, now=now, policy=policy)


def _material(job: Job, position: int, reason: str, start: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether a waiting job's standing changed enough to record: place, reason, or an estimate that moved
    by more than a minute and a fifth of the wait."""
    if (job.queue_position, job.waiting_reason) != (position, reason):
        return True
    before = job.estimated_start_at
    if (before is None) != (start is None):
        return True
    if before is None or start is None:
        return False
    return abs((start - before).total_seconds()) > max(60.0, 0.2 * (start - now).total_seconds())


def queue_event(position: int, reason: str, note: str, start: dt.datetime | None) -> dict[str, Any]:
    """The ``queue`` event a waiting job records when its standing changes."""
    return {
        "event": "queue",
        "queue_position": position,
        "waiting_reason": reason,
        "detail": note,
        "estimated_start_at": start.isoformat() if start else None,
    }


def dispatch(
    db: Database,
    settings: Settings,
    gpus: Sequence[GpuView],
    send: Sender,
    *,
    holder: str | None = None,
    now: dt.datetime | None = None,
    wake: Callable[[str], None] | None = None,
) -> DispatchReport:
    """One dispatch pass: under the lock, place what fits and mark it, and store where every other waiting
    job stands; then send each task.

    A send that fails takes its mark back (the job stays queued for the next pass) and is reported in
    ``failed``; the caller decides what that means (the API answers 503 for the job just submitted).

    Args:
        wake: called with the id of each job that recorded a ``queue`` event (publishes the wake-up that
            its event streams wait for).
    """
    now = now or utcnow()
    holder = holder or f"{socket.gethostname()}"
    recorded: list[str] = []
    over_quota = frozenset(db.over_quota_users(now))  # read before the lock: it reads the attempts
    with db.dispatch_lock(holder, now) as txn:
        queued_jobs = {j.id: j for j in txn.waiting()}
        if not queued_jobs:
            return DispatchReport()
        decided = decide_queue(txn, settings, gpus, now, over_quota=over_quota)
        plan = decided.plan
        marked = [p for p in plan.placements if txn.mark_dispatched(p.job_id, p.gpu, now)]
        preemption = choose_preemption(decided, gpus, settings, now, over_quota)
        if preemption is not None:
            _apply_preemption(txn, preemption, plan, now)
        position = 0
        for ticket in decided.order:
            if ticket.id not in plan.notes:
                continue
            position += 1
            job, reason, note = queued_jobs[ticket.id], plan.reasons[ticket.id], plan.notes[ticket.id]
            start = decided.starts.get(ticket.id)
            material = _material(job, position, reason, start, now)
            if material or job.dispatch_note != note:
                event = queue_event(position, reason, note, start) if material else None
                txn.set_queue_info(
                    ticket.id,
                    position=position,
                    reason=reason,
                    note=note,
                    estimated_start_at=start,
                    event=event,
                    now=now,
                )
                if event is not None:
                    recorded.append(ticket.id)
    report = DispatchReport(waiting=plan.notes, starts=decided.starts)
    if wake is not None:
        for job_id in recorded:
            wake(job_id)
    for placement in marked:
        try:
            send(placement.job_id, placement.queue)
        except Exception as exc:  # kombu/redis raise many kinds; each job is handled alone
            log.warning("dispatch: job %s not sent to %s: %s", placement.job_id, placement.queue, exc)
            db.undispatch(
                placement.job_id,
                now,
                f"waiting: the job queue was unreachable ({type(exc).__name__})",
                QUEUE_UNREACHABLE,
            )
            report.failed.append((placement, exc))
        else:
            report.sent.append(placement)
    if report.sent:
        log.info("dispatch: %s", ", ".join(f"{p.job_id}→{p.queue}" for p in report.sent))
    return report


def _apply_preemption(txn: DispatchTxn, preemption: Preemption, plan: Plan, now: dt.datetime) -> None:
    """Ask the victims' supervisors to stop them (``preempted_by``); the preemptor says it is preempting."""
    victims = [v for v in preemption.victims if txn.request_preemption(v, preemption.preemptor, now)]
    if not victims:
        return
    names = ", ".join(sorted(victims))
    log.info("dispatch: %s preempts %s on GPU %s", preemption.preemptor, names, preemption.gpu)
    plan.wait(
        preemption.preemptor,
        f"{PREEMPTING} {names}",
        f"waiting: {names} checkpoint to make room on GPU {preemption.gpu}; it starts next",
    )


def recover_stale(
    db: Database, gpus: Sequence[GpuView], settings: Settings, *, now: dt.datetime | None = None
) -> list[str]:
    """Take back dispatches to GPUs that are no longer placeable (offline, drained, quarantined) and
    that no worker took within ``dispatch_stale_s``; the next pass places them again."""
    now = now or utcnow()
    placeable = {g.uuid for g in gpus if g.placeable}
    taken_back = []
    for job in db.stale_dispatches(now - dt.timedelta(seconds=settings.dispatch_stale_s)):
        if job.gpu == "cpu" or job.gpu in placeable or job.dispatched_at is None:
            continue
        note = f"waiting: GPU {job.gpu} stopped taking jobs; placing it again"
        if db.undispatch(job.id, job.dispatched_at, note, GPU_OFFLINE):
            taken_back.append(job.id)
    if taken_back:
        log.warning("dispatch: took back stale dispatches %s", taken_back)
    return taken_back


class Dispatcher:
    """Dispatch with this deployment's settings, heartbeats (Redis) and sender: what the API, the
    supervisor and the janitor call."""

    def __init__(
        self, settings: Settings, db: Database, send: Sender, heartbeats: HeartbeatSource | None = None
    ) -> None:
        self.settings, self.db, self.send = settings, db, send
        self._board: GpuBoard | None = None
        if heartbeats is None:
            self._board = GpuBoard(settings.redis_url or None)
            heartbeats = self._board.heartbeats
        self.heartbeats: HeartbeatSource = heartbeats
        self._events = EventPublisher(settings.redis_url or None)

    def gpus(self) -> list[GpuView]:
        return gpu_views(self.db, self.heartbeats)

    def run(self, *, recover: bool = False) -> DispatchReport:
        gpus = self.gpus()
        if recover:
            recover_stale(self.db, gpus, self.settings)
        return dispatch(self.db, self.settings, gpus, self.send, wake=self.wake)

    def wake(self, job_id: str) -> None:
        """Wake the event streams of a job that recorded a ``queue`` event."""
        self._events.publish(job_id, {"event": "wake"})

    def close(self) -> None:
        self._events.close()
        if self._board is not None:
            self._board.close()
