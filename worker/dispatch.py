"""Dispatch: the queue decided under the DB's dispatch lock, then each placed job sent to ``gpu.<uuid>``.

The rule itself is worker/placement.py (which job fits where, and why the others wait); the start forecast
is worker/forecast.py; preemption is planned by worker/preemption.py and applied here. Each pass stores on
every waiting job its ``queue_position``, ``waiting_reason`` with a sentence (``dispatch_note``) and
``estimated_start_at``; a change is recorded as a ``queue`` event.

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
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings
from core.states import QUEUED, RUNNING
from models.spec import resources_of
from store import Database, DispatchTxn, Job, utcnow
from worker.fairshare import FairPolicy, UsageSpan, decayed_usage, fair_order
from worker.forecast import Durations, Holding, forecast_starts
from worker.gpus import budget_bytes, context_allowance_bytes
from worker.heartbeat import GpuBoard, HeartbeatSource
from worker.placement import (
    BEHIND_EARLIER_JOB,
    GPU_FULL,
    GPU_OFFLINE,
    OVER_QUOTA,
    PREEMPTED_BY,
    PREEMPTING,
    QUEUE_UNREACHABLE,
    GpuView,
    Load,
    Placement,
    Plan,
    QueuedJob,
    Ticket,
    fits_on,
    gpu_views,
    plan_dispatch,
)
from worker.preemption import Claimant, Holder, Preemption, PreemptPolicy, plan_preemption
from worker.queues import Sender, cpu_queue
from worker.relay import EventPublisher

log = logging.getLogger(__name__)


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
    extras: Sequence[QueuedJob] = (),
    over_quota: frozenset[int] = frozenset(),
) -> QueuePass:
    """Order the waiting jobs (fair share), place what fits, and forecast the others' starts.

    Args:
        extra: a job not in the database, considered as if it had been submitted at ``now`` (a dry run).
        extras: several such jobs (a study's first trials).
        over_quota: the users over their GPU-hour quota: their jobs go after everyone else's, so they run
            only on room nobody else waits for.
    """
    policy = FairPolicy(settings.fair_share_half_life_s, settings.queue_aging_s)
    waiting: list[QueuedJob] = [*txn.waiting(), *([extra] if extra is not None else []), *extras]
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
        load = Load()
        for ticket in holding:
            if ticket.gpu == gpu and ticket.id not in without:
                load.fraction += ticket.fraction
                load.need += budget_bytes(ticket.fraction, by_uuid[gpu].memory_total_bytes, rule["allowance"])
                load.jobs += 1
        # What gpuyard's jobs hold now is read from NVML; the stopped victims' share of it will be released.
        board = dataclasses.replace(by_uuid[gpu], gpuyard_bytes=0)
        return fits_on(board, load, tickets[claimant.id], rule["reserve"], rule["allowance"])

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

