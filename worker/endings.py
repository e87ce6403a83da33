"""How an attempt ends: its facts gathered for :func:`worker.outcome.decide_outcome`, and the decision done.

The supervisor (worker/supervisor.py) runs the attempt; this mixin of its class turns the attempt's end
into the recorded result: finish the job (retried through a database blip while the lease may hold),
hand it back to the queue (a retry, or a resize with a new memory fraction), queue a preempted job
again, or record nothing when the lease was lost.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from core.states import QUEUED
from models.spec import resources_of
from store import Database, Job
from store.errors import DatabaseUnavailable
from worker.gpus import context_allowance_bytes, fraction_for
from worker.lease import LeaseKeeper
from worker.outcome import (
    LEASE_LOST,
    PREEMPTED,
    PREEMPTED_EVENT,
    RESIZED_EVENT,
    TRAINER_KILLED,
    AttemptEnd,
    Decision,
    LeaseLostDecision,
    Outcome,
    PreemptedDecision,
    RequeueDecision,
    ResizeDecision,
)
from worker.watchdog import HostMemoryWatchdog, MemoryWatchdog

log = logging.getLogger("worker.supervisor")  # the supervisor's records, under its name as before


class Endings:
    """The ending half of :class:`worker.supervisor.Supervisor`: the run's state it reads is set there."""

    job_id: str
    settings: Settings
    db: Database
    owner: str
    requeue: Callable[[str], None] | None
    progress: dict[str, Any]
    failed_event: dict[str, Any] | None
    preempted_by: str | None
    watchdog: MemoryWatchdog | None
    gpu_total_bytes: int | None
    host_memory: HostMemoryWatchdog | None
    peak_rss_bytes: int
    keeper: LeaseKeeper | None

    def _attempt_end(self, job: Job, exit_code: int, stop_reason: str | None) -> AttemptEnd:
        """The facts of the attempt's end that :func:`decide_outcome` decides on."""
        settings, watchdog, host = self.settings, self.watchdog, self.host_memory
        cancel_requested = False
        if stop_reason != LEASE_LOST and exit_code != 0:
            cancel_requested = self.db.is_cancel_requested(self.job_id)
        killed = stop_reason is None and exit_code == -signal.SIGKILL
        resized_before = (
            watchdog is not None
            and exit_code != 0
            and any(e.event.get("event") == RESIZED_EVENT for e in self.db.events_since(self.job_id, 0))
        )
        return AttemptEnd(
            exit_code=exit_code,
            stop_reason=stop_reason,
            failed_detail=(self.failed_event or {}).get("detail"),
            cancel_requested=cancel_requested,
            preempted_by=self.preempted_by,
            gpu_watched=watchdog is not None,
            gpu_peak_bytes=watchdog.peak_bytes if watchdog is not None else 0,
            gpu_exceeded_bytes=watchdog.exceeded_bytes if watchdog is not None else None,
            gpu_budget_bytes=watchdog.budget_bytes if watchdog is not None else None,
            gpu_total_bytes=self.gpu_total_bytes,
            host_exceeded_bytes=host.exceeded_bytes if host is not None else None,
            host_limit_bytes=host.limit_bytes if host is not None else None,
            peak_rss_bytes=self.peak_rss_bytes,
            kills_in_a_row=self._kills_in_a_row() if killed else 0,
            kills_before_oom=settings.trainer_kills_before_oom,
            memory_fraction=resources_of(job.spec).fraction,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            resized_before=resized_before,
            allowance_bytes=context_allowance_bytes(settings),
            memory_margin=settings.memory_margin,
            fraction_limit=min(1.0 - settings.gpu_reserve_fraction, settings.max_gpu_fraction_per_user),
        )

    def _apply(self, job: Job, decision: Decision, base: dict[str, Any], exit_code: int) -> Outcome:
        """Do what :func:`decide_outcome` decided."""
        if isinstance(decision, LeaseLostDecision):
            log.warning("job %s: lease lost; trainer killed, nothing recorded", self.job_id)
            return Outcome(**base, reason=LEASE_LOST)
        if isinstance(decision, PreemptedDecision):
            return self._preempted(job, decision, base)
        if isinstance(decision, ResizeDecision):
            self.db.append_event(self.job_id, decision.event())
            resources = {**(job.spec.get("resources") or {}), "memory_fraction": decision.memory_fraction}
            return self._hand_back(base, decision.reason, decision.detail, spec={**job.spec, "resources": resources})
        if isinstance(decision, RequeueDecision):
            return self._hand_back(base, decision.reason, decision.detail)
        outcome = self._finish(job, decision.state, decision.reason, decision.detail, exit_code)
        return Outcome(**{**base, "state": outcome.state, "reason": outcome.reason, "detail": outcome.detail})

    def _preempted(self, job: Job, decision: PreemptedDecision, base: dict[str, Any]) -> Outcome:
        """Queue a preempted job again (its attempt not counted) with a ``preempted`` event."""
        peak = self.watchdog.peak_bytes if self.watchdog is not None and self.watchdog.readings else None
        event = {
            "event": PREEMPTED_EVENT,
            "by": decision.by,
            "attempt": job.attempts,
            "epoch": self.progress.get("epoch"),
            "detail": decision.detail,
        }
        new_state = self.db.requeue_preempted(self.job_id, self.owner, event, peak_gpu_memory_bytes=peak or None)
        if new_state == QUEUED and self.requeue is not None:
            self.requeue(self.job_id)
        log.info("job %s: preempted by %s, now %s", self.job_id, decision.by, new_state)
        return Outcome(**base, state=new_state, reason=PREEMPTED, detail=decision.detail)

    def _kills_in_a_row(self) -> int:
        """How many of this job's latest hand-backs, in a row, were trainers killed by a signal."""
        reasons = [
            e.event.get("reason")
            for e in self.db.events_since(self.job_id, 0, limit=10_000)
            if e.event.get("event") == "state" and e.event.get("state") == QUEUED and e.event.get("reason")
        ]
        kills = 0
        for reason in reversed(reasons):
            if reason != TRAINER_KILLED:
                break
            kills += 1
        return kills

    def _finish(self, job: Job, state: str, reason: str | None, detail: str | None, exit_code: int | None) -> Outcome:
        peak = self.watchdog.peak_bytes if self.watchdog is not None and self.watchdog.readings else None
        suggested = None
        if peak and self.gpu_total_bytes:
            allowance = context_allowance_bytes(self.settings)
            suggested = min(1.0, fraction_for(peak, self.gpu_total_bytes, allowance, self.settings.memory_margin))
        if not self._while_leased(
            lambda: self.db.finish_job(
                self.job_id,
                self.owner,
                state,
                reason,
                detail,
                exit_code,
                peak_gpu_memory_bytes=peak,
                suggested_memory_fraction=suggested,
            )
        ):
            log.warning("job %s: lease lost before the result could be recorded", self.job_id)
            return Outcome(self.job_id, ran=True, reason=LEASE_LOST, attempt=job.attempts, exit_code=exit_code)
        log.info("job %s: %s%s", self.job_id, state, f" ({reason})" if reason else "")
        return Outcome(
            self.job_id,
            ran=True,
            state=state,
            reason=reason,
            detail=detail,
            exit_code=exit_code,
            attempt=job.attempts,
        )

    def _while_leased(self, record: Callable[[], bool]) -> bool:
        """``record()``, tried again each second while the database is unavailable and the lease may still
        hold: a trainer's result must outlive a database blip, or the janitor would run the job again.
        ``finish_job`` is conditional on the lease, so a late retry changes nothing that is not ours.

        Raises:
            DatabaseUnavailable: still unavailable when the lease ran out.
        """
        while True:
            try:
                return record()
            except DatabaseUnavailable as exc:
                if self.keeper is None or self.keeper.expired():
                    raise
                log.warning("job %s: cannot record the result yet (%s); trying again", self.job_id, exc)
                time.sleep(1.0)

    def _hand_back(
        self, base: dict[str, Any], reason: str, detail: str | None, *, spec: dict[str, Any] | None = None
    ) -> Outcome:
        peak = self.watchdog.peak_bytes if self.watchdog is not None and self.watchdog.readings else None
        new_state = self.db.requeue_job(
            self.job_id, self.owner, reason, detail, spec=spec, peak_gpu_memory_bytes=peak or None
        )
        if new_state == QUEUED and self.requeue is not None:
            self.requeue(self.job_id)
        log.warning("job %s: handed back (%s), now %s", self.job_id, reason, new_state)
        return Outcome(**base, state=new_state, reason=reason, detail=detail)
