"""Dispatch bookkeeping: the dispatch lock and what a dispatcher may read and mark under it."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session

from core.states import (
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
)
from store.base import _NOT_WAITING, StoreBase, rowcount
from store.tables import (
    Dataset,
    DispatchLock,
    Job,
    utcnow,
)

_PG_DISPATCH_LOCK = 0x67707965


@dataclass
class DispatchTxn:
    """What a dispatcher may do while it holds the dispatch lock (:meth:`Database.dispatch_lock`)."""

    session: Session
    append: Callable[[Session, str, dict[str, Any], dt.datetime], int]

    def waiting(self) -> list[Job]:
        """Queued jobs not yet placed (and not being cancelled), in dispatch order: priority, then FIFO."""
        return list(
            self.session.scalars(
                select(Job)
                .where(Job.state == QUEUED, Job.dispatched_at.is_(None), Job.cancel_requested.is_(False))
                .order_by(Job.priority.desc(), Job.queued_at, Job.id)
            ).unique()
        )

    def placed(self) -> list[Job]:
        """Jobs holding room on a GPU (or the CPU queue): running, or dispatched and not yet taken."""
        return list(
            self.session.scalars(
                select(Job).where(or_(Job.state == RUNNING, and_(Job.state == QUEUED, Job.dispatched_at.is_not(None))))
            ).unique()
        )

    def finished_since(self, since: dt.datetime, *, limit: int = 5000) -> list[Job]:
        """Jobs that ran and ended at or after ``since``, newest first (fair-share usage, duration estimates)."""
        return list(
            self.session.scalars(
                select(Job)
                .where(Job.state.in_(TERMINAL_STATES), Job.finished_at >= since, Job.started_at.is_not(None))
                .order_by(Job.finished_at.desc())
                .limit(limit)
            ).unique()
        )

    def mark_dispatched(self, job_id: str, gpu: str, now: dt.datetime) -> bool:
        """Place a waiting job on ``gpu`` (a UUID or ``cpu``); False when it is no longer waiting."""
        return (
            rowcount(self.session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at.is_(None))
                .values(gpu=gpu, dispatched_at=now, **_NOT_WAITING)
                .execution_options(synchronize_session=False)
            ))
            == 1
        )

    def request_preemption(self, job_id: str, by: str, now: dt.datetime) -> bool:
        """Ask a running job's supervisor to stop it for ``by`` (it polls ``preempted_by``); recorded as a
        ``preempting`` event on the victim. False when it is no longer running, or already being stopped."""
        changed = rowcount(
            self.session.execute(
                update(Job)
                .where(
                    Job.id == job_id, Job.state == RUNNING, Job.preempted_by.is_(None), Job.cancel_requested.is_(False)
                )
                .values(
                    preempted_by=by,
                    preempted_at=now,
                    waiting_reason=f"preempted_by {by}",
                    dispatch_note=f"stopping: preempted by {by}, a higher-priority job; it checkpoints and requeues",
                )
                .execution_options(synchronize_session=False)
            )
        )
        if changed == 1:
            self.append(self.session, job_id, {"event": "preempting", "by": by}, now)
        return changed == 1

    def set_queue_info(
        self,
        job_id: str,
        *,
        position: int,
        reason: str,
        note: str,
        estimated_start_at: dt.datetime | None,
        event: dict[str, Any] | None,
        now: dt.datetime,
    ) -> None:
        """Say where a queued job stands (shown by GET /v1/jobs/<id>), recording ``event`` when given."""
        changed = rowcount(self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at.is_(None))
            .values(
                queue_position=position,
                waiting_reason=reason,
                dispatch_note=note,
                estimated_start_at=estimated_start_at,
            )
            .execution_options(synchronize_session=False)
        ))
        if changed == 1 and event is not None:
            self.append(self.session, job_id, event, now)


class DispatchStore(StoreBase):
    """The dispatch lock, stale dispatches and measured peaks (``worker/dispatch.py`` decides)."""

    # ── dispatch (worker/dispatch.py decides; these read and mark under the dispatch lock) ──
    @contextlib.contextmanager
    def dispatch_lock(self, holder: str, now: dt.datetime | None = None) -> Iterator[DispatchTxn]:
        """A transaction holding the dispatch lock: one dispatcher at a time reads, decides and marks.

        PostgreSQL: a transaction-scoped advisory lock. SQLite: the first statement is a write (the lock
        row's UPDATE), which takes the database's write lock until commit, so a second dispatcher waits
        at that statement (busy timeout) instead of reading a snapshot the first is about to change.
        """
        now = now or utcnow()
        with self._begin() as s:
            if self.is_postgres:
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_DISPATCH_LOCK})
            held = rowcount(s.execute(
                update(DispatchLock)
                .where(DispatchLock.id == 1)
                .values(held_by=holder, held_at=now)
                .execution_options(synchronize_session=False)
            ))
            if held != 1:
                s.add(DispatchLock(id=1, held_by=holder, held_at=now))
                s.flush()
            yield DispatchTxn(s, self._append)

    @contextlib.contextmanager
    def peek_queue(self) -> Iterator[DispatchTxn]:
        """The dispatcher's view without its lock, to read only (a dry run's forecast)."""
        with self._begin() as s:
            yield DispatchTxn(s, self._append)

    def undispatch(self, job_id: str, dispatched_at: dt.datetime, note: str, reason: str) -> bool:
        """Take back a dispatch whose task could not be sent (still queued, same dispatch): the next
        dispatch pass places the job again."""
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at == dispatched_at)
                    .values(gpu=None, dispatched_at=None, dispatch_note=note, waiting_reason=reason)
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def stale_dispatches(self, before: dt.datetime) -> list[Job]:
        """Jobs dispatched before ``before`` that no worker has taken yet."""
        with self._begin() as s:
            return list(
                s.scalars(
                    select(Job).where(Job.state == QUEUED, Job.dispatched_at.is_not(None), Job.dispatched_at < before)
                ).unique()
            )

    def recent_peaks(self, family: str, *, limit: int = 20) -> list[tuple[Job, dict[str, Any]]]:
        """The latest succeeded jobs of an architecture ``family`` that recorded a GPU memory peak, each with
        its data set's summary (automatic budgets learn from them)."""
        with self._begin() as s:
            rows = s.execute(
                select(Job, Dataset.summary)
                .join(Dataset, Dataset.id == Job.dataset_id)
                .where(
                    Job.state == SUCCEEDED,  # a killed job's peak is where it was stopped, not what it needed
                    Job.peak_gpu_memory_bytes.is_not(None),
                    Job.spec["architecture"]["family"].as_string() == family,
                )
                .order_by(Job.finished_at.desc())
                .limit(limit)
            ).all()
            return [(job, summary) for job, summary in rows]
