"""Placement: which queued job goes to which GPU, decided under a DB lock, then sent to ``gpu.<uuid>``.

The rule (``plan_dispatch``, a pure function) for a GPU job of memory fraction ``f`` on GPU ``g``:

* ``g`` is online (a live heartbeat), not draining, not quarantined, and has a free worker slot;
* fractions: ``f`` + the fractions of ``g``'s running and dispatched jobs ≤ ``1 − gpu_reserve_fraction``;
* memory: ``need(f) = min(total, f × total + allowance)`` fits in ``total − foreign − committed``, where
  ``foreign`` is the memory of processes on ``g`` that gpuyard did not start (NVML or fake readings) and
  ``committed`` the larger of the needs of ``g``'s gpuyard jobs and what they hold now;
* the owner's running + dispatched fractions plus ``f`` ≤ ``max_gpu_fraction_per_user``.

Among the GPUs that fit: best fit, the one left with the least free fraction (then memory, then index).

Order and fairness: strict FIFO within a priority, higher priorities first. A job that fits nowhere
waits at the head of its GPUs: every GPU it could use is closed to later jobs in this pass, so a stream
of small jobs never starves a big one. Later jobs may still start on GPUs the blocked job cannot use
(another uuid, a drained GPU). A job held back only by its owner's cap blocks nobody. A waiting job's
place (``queue_position``) and the reason (``dispatch_note``) are shown by GET /v1/jobs/<id>.

CPU jobs (``resources.gpu: cpu``, or any job when no GPU was ever registered) go to ``train_queue`` at once.

Two dispatchers never overcommit: read, decide and mark run in one transaction holding the dispatch
lock (``Database.dispatch_lock``). The job is marked (``gpu``, ``dispatched_at``) before its task is
sent; a send that fails takes the mark back. Dispatch runs on submit (the API), when a job ends (the
supervisor) and every janitor pass.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from core.errors import Problem
from core.settings import Settings
from models.spec import resources_of
from worker.db import Database, Gpu, Job, utcnow
from worker.gpus import budget_bytes, context_allowance_bytes
from worker.queues import Sender, cpu_queue, gpu_queue

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "gpuyard:gpu:"
_EPS = 1e-9



def heartbeat_key(gpu_uuid: str) -> str:
    """The Redis key holding a GPU's latest heartbeat (JSON, with a TTL)."""
    return HEARTBEAT_PREFIX + gpu_uuid


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
    row: Gpu | None = None

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
        return view


@dataclass(frozen=True)
class Ticket:
    """What placement needs to know of a job."""

    id: str
    owner_id: int
    fraction: float
    request: str  # "any" | "cpu" | a GPU UUID
    gpu: str | None = None  # where it runs or was dispatched (active jobs)

    @classmethod
    def of(cls, job: Job) -> Ticket:
        resources = resources_of(job.spec)
        return cls(job.id, job.owner_id, resources.memory_fraction, resources.gpu, job.gpu)


# ── the rule ──────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Placement:
    job_id: str
    gpu: str  # a UUID, or "cpu"
    queue: str


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # job id → why it waits


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
            plan.notes[ticket.id] = f"waiting: GPU {ticket.request} is not registered by any worker"
            continue
        if user_share[ticket.owner_id] + ticket.fraction > user_cap + _EPS:
            plan.notes[ticket.id] = (
                f"waiting: your running jobs hold {user_share[ticket.owner_id]:.2f} GPU; the limit per user "
                f"is {user_cap:g} (max_gpu_fraction_per_user)"
            )
            continue
        wanted = [g for g in gpus if ticket.request in ("any", g.uuid)]
        candidates = [g for g in wanted if g.placeable]
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
        plan.notes[ticket.id] = _why_waiting(ticket, wanted, candidates, closed, load, reserve, allowance)
        closed.update(g.uuid for g in candidates)  # strict FIFO: no later job overtakes it on these GPUs
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
) -> str:
    if not candidates:
        states = ", ".join(f"{g.index}:{g.state}" for g in wanted) or "none registered"
        return f"waiting: no GPU can take new jobs ({states})"
    if all(g.uuid in closed for g in candidates):
        return "waiting: behind an earlier job that is waiting for the same GPUs (FIFO)"
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
    return f"waiting for room (memory_fraction {ticket.fraction:g}): " + "; ".join(parts)


# ── refusing what can never run ───────────────────────────────────────────────────────────────────────
def never_fits(spec: dict[str, Any], gpus: Sequence[GpuView], settings: Settings) -> list[Problem]:
    """Why a job could never be placed, whatever finishes (empty when it could). Checked at submit.

    A named GPU must be registered; the fraction must fit ``1 − reserve`` and the per-user cap. (Memory
    never refuses: a job's need is capped at its GPU's total, so an empty GPU always holds it.)
    """
    resources = resources_of(spec)
    fraction, request = resources.memory_fraction, resources.gpu
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


# ── heartbeats (Redis) ────────────────────────────────────────────────────────────────────────────────
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


HeartbeatSource = Callable[[Sequence[str]], dict[str, dict[str, Any]]]


def gpu_views(db: Database, heartbeats: HeartbeatSource) -> list[GpuView]:
    """Every registered GPU with its latest heartbeat (offline when it has none)."""
    rows = db.list_gpus()
    beats = heartbeats([r.uuid for r in rows]) if rows else {}
    return [GpuView.of(row, beats.get(row.uuid)) for row in rows]


# ── doing it ──────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class DispatchReport:
    sent: list[Placement] = field(default_factory=list)
    failed: list[tuple[Placement, Exception]] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)


def dispatch(
    db: Database,
    settings: Settings,
    gpus: Sequence[GpuView],
    send: Sender,
    *,
    holder: str | None = None,
    now: dt.datetime | None = None,
) -> DispatchReport:
    """One dispatch pass: under the lock, place what fits and mark it; then send each task.

    A send that fails takes its mark back (the job stays queued for the next pass) and is reported in
    ``failed``; the caller decides what that means (the API answers 503 for the job just submitted).
    """
    now = now or utcnow()
    holder = holder or f"{socket.gethostname()}"
    with db.dispatch_lock(holder, now) as txn:
        queued_jobs = txn.waiting()
        if not queued_jobs:
            return DispatchReport()
        plan = plan_dispatch(
            [Ticket.of(j) for j in queued_jobs],
            [Ticket.of(j) for j in txn.placed()],
            gpus,
            cpu_queue=cpu_queue(settings),
            reserve=settings.gpu_reserve_fraction,
            allowance=context_allowance_bytes(settings),
            user_cap=settings.max_gpu_fraction_per_user,
        )
        marked = [p for p in plan.placements if txn.mark_dispatched(p.job_id, p.gpu, now)]
        notes_now = {j.id: j.dispatch_note for j in queued_jobs}
        for job_id, note in plan.notes.items():
            if notes_now.get(job_id) != note:
                txn.set_note(job_id, note)
    report = DispatchReport(waiting=plan.notes)
    for placement in marked:
        try:
            send(placement.job_id, placement.queue)
        except Exception as exc:  # kombu/redis raise many kinds; each job is handled alone
            log.warning("dispatch: job %s not sent to %s: %s", placement.job_id, placement.queue, exc)
            db.undispatch(placement.job_id, now, f"waiting: the job queue was unreachable ({type(exc).__name__})")
            report.failed.append((placement, exc))
        else:
            report.sent.append(placement)
    if report.sent:
        log.info("dispatch: %s", ", ".join(f"{p.job_id}→{p.queue}" for p in report.sent))
    return report


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
        if db.undispatch(job.id, job.dispatched_at, f"waiting: GPU {job.gpu} stopped taking jobs; placing it again"):
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
        self._board = None if heartbeats is not None else GpuBoard(settings.redis_url or None)
        self.heartbeats: HeartbeatSource = heartbeats or self._board.heartbeats  # type: ignore[union-attr]

    def gpus(self) -> list[GpuView]:
        return gpu_views(self.db, self.heartbeats)

    def run(self, *, recover: bool = False) -> DispatchReport:
        gpus = self.gpus()
        if recover:
            recover_stale(self.db, gpus, self.settings)
        return dispatch(self.db, self.settings, gpus, self.send)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
