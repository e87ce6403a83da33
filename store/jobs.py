"""Jobs: creation, listing, leases, progress, the end of a job and the janitor's requeue."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from core.states import (
    ACTIVE_STATES,
    CANCELLED,
    INTERRUPTED,
    JOB_STATES,
    PRUNED,
    QUEUED,
    RUNNING,
    TERMINAL_STATES,
)
from store.base import _CANCELLED_REASON, _NOT_WAITING, StoreBase, _state_event, rowcount
from store.engine import reading
from store.errors import ActiveJobLimit, UnknownDataset
from store.tables import (
    Dataset,
    Job,
    User,
    new_id,
    utcnow,
)
from store.usage import close_attempt, open_attempt


@dataclass
class JanitorReport:
    """What one :meth:`Database.requeue_expired` pass did."""

    requeued: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


@dataclass
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


class JobsStore(StoreBase):
    """Jobs through their lifecycle (``core.states``); every race decided by a guarded UPDATE."""

    # ── jobs ──
    def create_job(
        self,
        owner_id: int,
        dataset_id: str,
        spec: dict[str, Any],
        *,
        max_active: int,
        max_attempts: int,
        priority: int = 0,
        memory_fraction_auto: bool = False,
        notify: list[str] | None = None,
        study_id: str | None = None,
        trial_number: int | None = None,
        now: dt.datetime | None = None,
    ) -> Job:
        """Queue a job, unless the owner already has ``max_active`` queued or running jobs.

        ``notify``: the URLs told when the job ends (None: the owner's defaults; []: none).
        ``study_id``, ``trial_number``: a study's trial (worker/studies.py). Trials neither count against
        ``max_active`` nor are refused by it: a study bounds its own with ``max_parallel`` (docs/studies.md).

        Raises:
            ActiveJobLimit: the owner is at the cap.
            UnknownDataset: the data set does not exist.
        """
        now = now or utcnow()
        with self._begin() as s:
            # Lock the owner's row first (a row lock on PostgreSQL, the write lock on SQLite) so two
            # concurrent submissions cannot both pass the count below.
            if self.is_postgres:
                s.execute(select(User.id).where(User.id == owner_id).with_for_update())
            s.execute(update(User).where(User.id == owner_id).values(is_admin=User.is_admin))
            active = s.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.owner_id == owner_id, Job.state.in_(ACTIVE_STATES), Job.study_id.is_(None))
            ) or 0
            if active >= max_active and study_id is None:
                raise ActiveJobLimit(
                    f"you have {active} queued or running jobs; the limit is {max_active}. "
                    "Wait for one to finish or cancel one."
                )
            if s.get(Dataset, dataset_id) is None:
                raise UnknownDataset(f"data set {dataset_id} does not exist")
            job = Job(
                id=new_id("job"),
                owner_id=owner_id,
                dataset_id=dataset_id,
                spec=spec,
                state=QUEUED,
                priority=priority,
                memory_fraction_auto=memory_fraction_auto,
                attempts=0,
                max_attempts=max_attempts,
                queued_at=now,
                cancel_requested=False,
                last_event_seq=0,
                notify=notify,
                study_id=study_id,
                trial_number=trial_number,
            )
            s.add(job)
            s.flush()
            self._append(s, job.id, {"event": "state", "state": QUEUED}, now)
            s.refresh(job)
            return job

    def get_job(self, job_id: str, owner_id: int | None = None) -> Job | None:
        """The job, or None if missing or (when ``owner_id`` is given) someone else's."""
        with self._begin() as s:
            query = select(Job).where(Job.id == job_id)
            if owner_id is not None:
                query = query.where(Job.owner_id == owner_id)
            return s.scalar(query)

    def read_job(self, job_id: str, owner_id: int | None = None) -> Job | None:
        """``get_job`` for a reader that only looks (``GET /v1/jobs/<id>``): one prepared Core ``SELECT``
        joined to the owner's name, with no session and no identity map (the ORM load costs twice as much
        on SQLite), the row as a detached ``Job`` whose ``owner`` carries the id and name only."""
        with reading(self.engine) as conn:
            row = conn.execute(_read_job_query(owner_id is not None), {"job_id": job_id, "owner_id": owner_id}).first()
        if row is None:
            return None
        values = row._asdict()
        owner = User(id=values["owner_id"], name=values.pop("_owner_name"))
        job = Job(**values)
        job.owner = owner
        return job

    def list_jobs(
        self,
        owner_id: int | None = None,
        *,
        state: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs newest first, ``limit`` at a time; pass the returned ``next_cursor`` for the next page.

        Raises:
            ValueError: ``cursor`` is not one this method returned, or ``state`` is unknown.
        """
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"Expected a state among {', '.join(JOB_STATES)}. Received: state={state!r}")
        query = select(Job).order_by(Job.queued_at.desc(), Job.id.desc()).limit(limit + 1)
        if owner_id is not None:
            query = query.where(Job.owner_id == owner_id)
        if state is not None:
            query = query.where(Job.state == state)
        if cursor:
            after_time, after_id = _decode_cursor(cursor)
            query = query.where(or_(Job.queued_at < after_time, and_(Job.queued_at == after_time, Job.id < after_id)))
        with self._begin() as s:
            jobs = list(s.scalars(query).unique())
        next_cursor = None
        if len(jobs) > limit:
            jobs = jobs[:limit]
            next_cursor = _encode_cursor(jobs[-1].queued_at, jobs[-1].id)
        return JobPage(jobs, next_cursor)

    def take_lease(
        self,
        job_id: str,
        owner: str,
        lease_seconds: float,
        *,
        gpu: str | None = None,
        now: dt.datetime | None = None,
    ) -> Job | None:
        """Claim a job for one attempt: the idempotency gate of every task delivery.

        Succeeds only when the job is ``queued``, or ``running`` with a lease that expired before ``now``,
        has no cancel request, and ``attempts < max_attempts``. Then: state ``running``, ``attempts + 1``,
        ``started_at = now``, ``lease_owner = owner``, ``lease_expires_at = now + lease_seconds``, ``gpu``
        set when given, and a a state event (running, with the attempt number).

        Args:
            job_id: the job.
            owner: who runs it; unique per delivery (e.g. ``"gpu0@host:pid:task_id"``).
            lease_seconds: lease length; renew well before it ends with :meth:`renew_lease`.
            gpu: GPU UUID or ``"cpu"``.
            now: the current time (tests).

        Returns:
            The claimed job, or None when someone else holds a live lease or the job is not runnable.
        """
        now = now or utcnow()
        runnable = and_(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            Job.attempts < Job.max_attempts,
            or_(Job.state == QUEUED, and_(Job.state == RUNNING, Job.lease_expires_at < now)),
        )
        if gpu is not None:
            # A job the dispatcher placed on one GPU runs there only: a stray message on another GPU's
            # queue (a re-dispatch after that GPU went offline) must not run it where nothing was reserved.
            runnable = and_(runnable, or_(Job.dispatched_at.is_(None), Job.gpu.is_(None), Job.gpu == gpu))
        values: dict[str, Any] = {
            "state": RUNNING,
            "attempts": Job.attempts + 1,
            "started_at": now,
            "lease_owner": owner,
            "lease_expires_at": now + dt.timedelta(seconds=lease_seconds),
            "preempted_by": None,  # a preempted job starting again is no longer "preempted by" anyone
        }
        if gpu is not None:
            values["gpu"] = gpu
        with self._begin() as s:
            if self.is_postgres:
                s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            claimed = rowcount(s.execute(
                update(Job).where(runnable).values(**values).execution_options(synchronize_session=False)
            ))
            if claimed != 1:
                return None
            job = s.get(Job, job_id, populate_existing=True)
            assert job is not None
            close_attempt(s, job_id, now, "lost")  # an expired lease taken over: its attempt ends here
            open_attempt(s, job, now)
            self._append(s, job_id, {"event": "state", "state": RUNNING, "attempt": job.attempts, "gpu": gpu}, now)
            return job

    def renew_lease(self, job_id: str, owner: str, lease_seconds: float, *, now: dt.datetime | None = None) -> bool:
        """Extend ``owner``'s lease to ``now + lease_seconds``.

        Returns:
            False when ``owner`` no longer holds the job (the janitor requeued it, or another worker took
            it): the caller must stop its trainer and record nothing more.
        """
        now = now or utcnow()
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (poll it with each lease renewal)."""
        with self._begin() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def stop_request(self, job_id: str) -> tuple[bool, str | None]:
        """What the supervisor's watch loop polls: whether a cancel was asked for, and the job the dispatcher
        preempts this running job for (None: not preempted)."""
        with self._begin() as s:
            row = s.execute(select(Job.cancel_requested, Job.preempted_by, Job.state).where(Job.id == job_id)).first()
        if row is None:
            return False, None
        return bool(row[0]), row[1] if row[2] == RUNNING else None

    def requeue_preempted(
        self,
        job_id: str,
        owner: str,
        event: dict[str, Any],
        *,
        peak_gpu_memory_bytes: int | None = None,
        now: dt.datetime | None = None,
    ) -> str | None:
        """Queue a preempted job again: its attempt is not counted (``attempts − 1``), ``preemptions + 1``,
        ``preempted_by`` kept until it starts again, the ``preempted`` ``event`` recorded. A job whose cancel
        was requested meanwhile is cancelled instead.

        Returns:
            The job's new state, or None when ``owner`` does not hold it.
        """
        now = now or utcnow()
        held = and_(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
        with self._begin() as s:
            values: dict[str, Any] = {
                "state": QUEUED,
                "attempts": Job.attempts - 1,
                "preemptions": Job.preemptions + 1,
                "lease_owner": None,
                "lease_expires_at": None,
                "gpu": None,
                "dispatched_at": None,
                **_NOT_WAITING,
            }
            if peak_gpu_memory_bytes is not None:
                values["peak_gpu_memory_bytes"] = peak_gpu_memory_bytes
            changed = rowcount(
                s.execute(
                    update(Job)
                    .where(held, Job.cancel_requested.is_(False))
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            )
            if changed != 1:
                return self._release(s, job_id, now, "preempted", event.get("detail"), owner=owner)
            close_attempt(s, job_id, now, "preempted")
            self._append(s, job_id, event, now)
            self._append(s, job_id, _state_event(QUEUED, "preempted", event.get("detail"), None), now)
            return QUEUED

    def record_progress(self, job_id: str, progress: dict[str, Any], *, owner: str | None = None) -> bool:
        """Store the latest progress (epoch, loss, metrics, samples_per_s, eta_s) of a running job.

        Returns:
            False if the job is not running (or, with ``owner``, not held by ``owner``).
        """
        condition = and_(Job.id == job_id, Job.state == RUNNING)
        if owner is not None:
            condition = and_(condition, Job.lease_owner == owner)
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Job)
                    .where(condition)
                    .values(last_progress=progress)
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def finish_job(
        self,
        job_id: str,
        owner: str,
        state: str,
        reason: str | None = None,
        detail: str | None = None,
        exit_code: int | None = None,
        *,
        peak_gpu_memory_bytes: int | None = None,
        suggested_memory_fraction: float | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """End ``owner``'s attempt in a terminal state and release the lease.

        Args:
            state: ``succeeded``, ``failed`` (the job's fault), ``cancelled`` or ``interrupted``
                (infrastructure).
            reason: machine-readable reason (``ExitCode.reason``, ``"worker_lost"``, ...).
            detail: a sentence for the user.
            exit_code: the trainer's exit code.
            peak_gpu_memory_bytes: the peak the GPU watchdog saw, if any.
            suggested_memory_fraction: what that peak plus a margin is of its GPU (worker.gpus).

        Returns:
            False when ``owner`` no longer holds the job; nothing is changed then.
        """
        if state not in TERMINAL_STATES:
            raise ValueError(f"Expected a terminal state among {', '.join(TERMINAL_STATES)}. Received: {state!r}")
        now = now or utcnow()
        values: dict[str, Any] = {
            "state": state,
            "finished_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "error_reason": reason,
            "error_detail": detail,
            "exit_code": exit_code,
        }
        if peak_gpu_memory_bytes is not None:
            values["peak_gpu_memory_bytes"] = peak_gpu_memory_bytes
        if suggested_memory_fraction is not None:
            values["suggested_memory_fraction"] = suggested_memory_fraction
        with self._begin() as s:
            if state == CANCELLED:  # a stop the study driver asked for ends pruned, with its reason
                pruned = s.execute(select(Job.prune_reason, Job.prune_detail).where(Job.id == job_id)).first()
                if pruned is not None and pruned[0] is not None:
                    state, reason, detail = PRUNED, pruned[0], pruned[1]
                    values.update(state=state, error_reason=reason, error_detail=detail)
            done = rowcount(s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
                .values(**values)
                .execution_options(synchronize_session=False)
            ))
            if done != 1:
                return False
            close_attempt(s, job_id, now, state)
            self._append(s, job_id, _state_event(state, reason, detail, exit_code), now)
            return True

    def requeue_job(
        self,
        job_id: str,
        owner: str,
        reason: str,
        detail: str | None = None,
        *,
        spec: dict[str, Any] | None = None,
        peak_gpu_memory_bytes: int | None = None,
        now: dt.datetime | None = None,
    ) -> str | None:
        """Hand a running job back (e.g. the worker is shutting down): queued again, or interrupted when
        it has used all its attempts, or cancelled when a cancel was requested.

        Args:
            spec: the job's spec from now on (a resized memory budget), stored with the hand-back.
            peak_gpu_memory_bytes: the peak the attempt reached, kept on the record.

        Returns:
            The job's new state, or None when ``owner`` does not hold it.
        """
        now = now or utcnow()
        with self._begin() as s:
            changes: dict[str, Any] = {}
            if spec is not None:
                changes["spec"] = spec
            if peak_gpu_memory_bytes is not None:
                changes["peak_gpu_memory_bytes"] = peak_gpu_memory_bytes
            if changes:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
                    .values(**changes)
                    .execution_options(synchronize_session=False)
                )
            return self._release(s, job_id, now, reason, detail, owner=owner)

    def interrupt_queued(self, job_id: str, reason: str, detail: str, *, now: dt.datetime | None = None) -> bool:
        """Mark a queued job that was never handed to a worker (e.g. the broker was down) interrupted.

        Returns:
            False if the job was no longer queued.
        """
        now = now or utcnow()
        with self._begin() as s:
            changed = rowcount(s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED)
                .values(state=INTERRUPTED, finished_at=now, error_reason=reason, error_detail=detail)
                .execution_options(synchronize_session=False)
            ))
            if changed == 1:
                self._append(s, job_id, _state_event(INTERRUPTED, reason, detail, None), now)
            return changed == 1

    def request_cancel(self, job_id: str, *, now: dt.datetime | None = None) -> Job | None:
        """Ask for a job to stop. A queued job is cancelled at once; a running one gets
        ``cancel_requested`` for its worker to act on; a finished one is left alone.

        Returns:
            The job after the change, or None if it does not exist.
        """
        now = now or utcnow()
        with self._begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            )
            detail = "cancelled before it started"
            cancelled = rowcount(s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED)
                .values(state=CANCELLED, finished_at=now, error_reason=_CANCELLED_REASON, error_detail=detail)
                .execution_options(synchronize_session=False)
            ))
            if cancelled == 1:
                self._append(s, job_id, _state_event(CANCELLED, _CANCELLED_REASON, detail, None), now)
            return s.get(Job, job_id, populate_existing=True)

    def requeue_expired(self, now: dt.datetime | None = None) -> JanitorReport:
        """The janitor: deal with every running job whose lease expired before ``now``.

        Each such job becomes ``cancelled`` if a cancel was requested, else ``queued`` again (lease
        cleared, ``attempts`` kept: the next :meth:`take_lease` counts the new attempt) while
        ``attempts < max_attempts``, else ``interrupted`` (reason ``worker_lost``). Each job is its own
        guarded transaction, so a racing ``take_lease`` or ``renew_lease`` wins or loses cleanly.

        Returns:
            Which jobs went where. The caller must send a task again for each ``requeued`` id.
        """
        now = now or utcnow()
        with self._begin() as s:
            expired = list(
                s.scalars(select(Job.id).where(Job.state == RUNNING, Job.lease_expires_at < now).order_by(Job.id))
            )
        report = JanitorReport()
        for job_id in expired:
            with self._begin() as s:
                new_state = self._release(
                    s, job_id, now, "worker_lost", "the worker running this job stopped renewing its lease"
                )
            if new_state == QUEUED:
                report.requeued.append(job_id)
            elif new_state == INTERRUPTED:
                report.interrupted.append(job_id)
            elif new_state == CANCELLED:
                report.cancelled.append(job_id)
        return report

    def _release(
        self,
        s: Session,
        job_id: str,
        now: dt.datetime,
        reason: str,
        detail: str | None,
        *,
        owner: str | None = None,
    ) -> str | None:
        """Move one running job out of its lease: expired (``owner`` None) or handed back by ``owner``."""
        held = and_(Job.id == job_id, Job.state == RUNNING)
        held = and_(held, Job.lease_owner == owner) if owner is not None else and_(held, Job.lease_expires_at < now)
        # An expired lease's attempt ended when the lease did (at the latest), not when the janitor noticed.
        ended = now if owner is not None else min(now, s.scalar(select(Job.lease_expires_at).where(held)) or now)
        cleared = {"lease_owner": None, "lease_expires_at": None}
        undispatched = {"gpu": None, "dispatched_at": None, **_NOT_WAITING}  # the dispatcher places it anew
        pruned = {"finished_at": now, "error_reason": Job.prune_reason, "error_detail": Job.prune_detail}
        steps = (
            (PRUNED, and_(Job.cancel_requested.is_(True), Job.prune_reason.is_not(None)), pruned),
            (CANCELLED, Job.cancel_requested.is_(True), {"finished_at": now, "error_reason": _CANCELLED_REASON}),
            (QUEUED, Job.attempts < Job.max_attempts, undispatched),
            (INTERRUPTED, Job.attempts >= Job.max_attempts, {"finished_at": now, "error_reason": reason}),
        )
        for new_state, condition, extra in steps:
            values = {"state": new_state, **cleared, **extra}
            if new_state == INTERRUPTED:
                values["error_detail"] = f"{detail or reason}; no attempts left"
            changed = rowcount(s.execute(
                update(Job).where(held, condition).values(**values).execution_options(synchronize_session=False)
            ))
            if changed == 1:
                close_attempt(s, job_id, ended, new_state)
                event_reason = reason if new_state != CANCELLED else _CANCELLED_REASON
                if new_state == PRUNED:  # the reason and detail the study driver gave (copied above)
                    pruned_reason, detail = s.execute(
                        select(Job.error_reason, Job.error_detail).where(Job.id == job_id)
                    ).one()
                    event_reason = pruned_reason or reason
                self._append(s, job_id, _state_event(new_state, event_reason, detail, None), now)
                return new_state
        return None


def _encode_cursor(queued_at: dt.datetime, job_id: str) -> str:
    raw = json.dumps([queued_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, job_id = json.loads(raw)
        parsed = dt.datetime.fromisoformat(when)
        if parsed.tzinfo is None or not isinstance(job_id, str):
            raise ValueError("bad cursor")
        return parsed, job_id
    except (ValueError, TypeError) as exc:
        raise ValueError(f"Expected a cursor from a previous page's next_cursor. Received: {cursor!r}") from exc


@functools.cache
def _read_job_query(by_owner: bool) -> Select[Any]:
    """The statement of :meth:`JobsStore.read_job`, built once per process (building it costs more than running it)."""
    jobs, users = Job.__table__, User.__table__
    query = (
        select(jobs, users.c.name.label("_owner_name"))
        .join(users, users.c.id == jobs.c.owner_id)
        .where(jobs.c.id == bindparam("job_id"))
    )
    return query.where(jobs.c.owner_id == bindparam("owner_id")) if by_owner else query
