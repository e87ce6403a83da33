"""The job database's one entry point, :class:`Database`: every read and write the API and workers make.

Every public method is one short transaction. Methods that two workers may race on (``take_lease``,
``requeue_expired``, ``finish_job``, ...) decide with a single guarded ``UPDATE ... WHERE <expected state>``
and look at its row count, which is atomic on both engines; PostgreSQL additionally locks the row first
with ``SELECT ... FOR UPDATE``. On SQLite the first statement of every writing transaction is a write, so
it takes the write lock (waiting out the busy timeout) instead of failing to upgrade a read snapshot.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.exitcodes import ExitCode
from core.states import (
    ACTIVE_STATES,
    CANCELLED,
    FAILED,
    INTERRUPTED,
    JOB_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
)
from worker.db import migrations
from worker.db.engine import make_engine
from worker.db.tables import (
    Dataset,
    DispatchLock,
    Gpu,
    Job,
    JobEvent,
    Operation,
    User,
    hash_token,
    new_id,
    utcnow,
)
from worker.errors import ActiveJobLimit, DatabaseUnavailable, DatasetInUse, UnknownDataset, UserExists

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PG_DISPATCH_LOCK = 0x67707965
_CANCELLED_REASON = ExitCode.CANCELLED.reason
# A job leaving the queue (dispatched, or put back to be placed anew) no longer has a place in it.
_NOT_WAITING: dict[str, Any] = {
    "dispatch_note": None,
    "queue_position": None,
    "waiting_reason": None,
    "estimated_start_at": None,
}


@dataclass
class JanitorReport:
    """What one :meth:`Database.requeue_expired` pass did."""

    requeued: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


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
            self.session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at.is_(None))
                .values(gpu=gpu, dispatched_at=now, **_NOT_WAITING)
                .execution_options(synchronize_session=False)
            ).rowcount
            == 1
        )

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
        changed = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at.is_(None))
            .values(
                queue_position=position,
                waiting_reason=reason,
                dispatch_note=note,
                estimated_start_at=estimated_start_at,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed == 1 and event is not None:
            self.append(self.session, job_id, event, now)


@dataclass
class MetricsSnapshot:
    """What ``GET /metrics`` reports of the job DB (:meth:`Database.metrics_snapshot`)."""

    by_state: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    waits: list[float] = field(default_factory=list)
    durations: dict[str, list[float]] = field(default_factory=dict)
    samples_per_s: dict[str, float] = field(default_factory=dict)
    running_by_gpu: dict[str, int] = field(default_factory=dict)


@dataclass
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


class Database:
    """The job database. One per process; thread-safe (each method opens its own session).

    Args:
        url: SQLAlchemy URL (see :func:`make_engine`).
        schema: PostgreSQL schema to work in (default: the server's search path).
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = url
        self.engine = make_engine(url, schema=schema)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Session]:
        try:
            with self._sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise DatabaseUnavailable(f"job database error: {type(exc).__name__}: {exc}") from exc

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless the database answers ``SELECT 1``."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"job database unreachable: {exc}") from exc

    # ── schema ──
    def schema_version(self) -> int | None:
        """The applied schema version, or None on a database never migrated."""
        return migrations.schema_version(self.engine)

    def migrate(self) -> int:
        """Bring the schema to the latest version; safe when several processes start at once (see
        :func:`worker.db.migrations.migrate`)."""
        return migrations.migrate(self.engine)

    # ── users ──
    def create_user(self, name: str, *, is_admin: bool = False) -> tuple[User, str]:
        """Create a user and return it with its bearer token (shown once; only its hash is stored).

        Raises:
            ValueError: the name is not 1–64 letters, digits, ``_ . -``.
            UserExists: the name is taken.
        """
        if not _USER_NAME.match(name):
            raise ValueError(f"Expected a user name of 1-64 letters, digits, '_', '.', '-'. Received: {name!r}")
        token = "gy_" + secrets.token_urlsafe(32)
        try:
            with self._begin() as s:
                user = User(name=name, is_admin=is_admin, token_hash=hash_token(token), created_at=utcnow())
                s.add(user)
                s.flush()
        except IntegrityError as exc:
            raise UserExists(f"a user named {name!r} already exists") from exc
        return user, token

    def user_for_token(self, token: str) -> User | None:
        """The user whose token this is, or None (also for a disabled user)."""
        with self._begin() as s:
            return s.scalar(select(User).where(User.token_hash == hash_token(token), User.disabled.is_(False)))

    def set_user_disabled(self, name: str, disabled: bool) -> User | None:
        """Disable a user (their token stops working at its next request) or enable them again; None if no
        such user."""
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.disabled = disabled
            return user

    def rotate_token(self, name: str) -> tuple[User, str] | None:
        """Give a user a new token (returned once) and void the old one at once; None if no such user."""
        token = "gy_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.token_hash = hash_token(token)
        return (user, token) if user is not None else None

    def set_max_priority(self, name: str, max_priority: int) -> User | None:
        """Set the highest priority ``name`` may give a job; None when there is no such user."""
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.max_priority = max_priority
            return user

    def rotate_webhook_secret(self, user_id: int) -> str | None:
        """Give a user a new webhook signing secret and return it (the one time it is shown); None if no
        such user. Webhooks sent from then on are signed with it."""
        secret = "whsec_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            changed = s.execute(
                update(User).where(User.id == user_id).values(webhook_secret=secret).execution_options(
                    synchronize_session=False
                )
            ).rowcount
        return secret if changed == 1 else None

    def webhook_secret(self, user_id: int) -> str:
        """The user's webhook signing secret, created on first use (the user rotates it to learn it).

        Raises:
            KeyError: no such user.
        """
        with self._begin() as s:
            current = s.scalar(select(User.webhook_secret).where(User.id == user_id))
        if current:
            return current
        candidate = "whsec_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            s.execute(
                update(User)
                .where(User.id == user_id, User.webhook_secret.is_(None))
                .values(webhook_secret=candidate)
                .execution_options(synchronize_session=False)
            )
            secret = s.scalar(select(User.webhook_secret).where(User.id == user_id))
        if secret is None:
            raise KeyError(f"user {user_id} does not exist")
        return secret

    def set_user_notify(self, user_id: int, urls: list[str] | None) -> User | None:
        """Set the notify URLs of the user's jobs that name none (None or []: no default); None if no user."""
        with self._begin() as s:
            user = s.get(User, user_id)
            if user is not None:
                user.notify = list(urls) if urls else None
            return user

    def user_by_name(self, name: str) -> User | None:
        with self._begin() as s:
            return s.scalar(select(User).where(User.name == name))

    def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None (the dashboard's session names its user by id)."""
        with self._begin() as s:
            return s.get(User, user_id)

    def list_users(self) -> list[User]:
        with self._begin() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    # ── data sets ──
    def add_dataset(
        self,
        owner_id: int,
        sha256: str,
        size_bytes: int,
        summary: dict[str, Any],
        storage_key: str,
        *,
        name: str | None = None,
        place_file: Callable[[], object] | None = None,
    ) -> tuple[Dataset, bool]:
        """Record a stored data set; the same content for the same owner returns the existing row.

        Args:
            place_file: puts the content-addressed file in place (or keeps the one there); called after the
                row is written, under the content's lock, so a concurrent delete of another row with the
                same content either finishes first (and the file is placed again) or sees this row.

        Returns:
            ``(dataset, created)``: ``created`` is False when the owner already had this content.
        """
        existing = self.find_dataset(owner_id, sha256)
        if existing is not None:
            return existing, False
        try:
            with self._begin() as s:
                self._lock_content(s, sha256)
                dataset = Dataset(
                    id=new_id("ds"),
                    owner_id=owner_id,
                    name=name,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    summary=summary,
                    storage_key=storage_key,
                    created_at=utcnow(),
                )
                s.add(dataset)
                s.flush()  # SQLite: the INSERT takes the database's write lock, held until commit
                if place_file is not None:
                    place_file()
                s.refresh(dataset)
                return dataset, True
        except IntegrityError:
            # The same upload raced us and won: theirs is ours.
            existing = self.find_dataset(owner_id, sha256)
            if existing is None:
                raise
            return existing, False

    def find_dataset(self, owner_id: int, sha256: str) -> Dataset | None:
        """The owner's data set with this content, if any."""
        with self._begin() as s:
            return s.scalar(select(Dataset).where(Dataset.owner_id == owner_id, Dataset.sha256 == sha256))

    def get_dataset(self, dataset_id: str, owner_id: int | None = None) -> Dataset | None:
        """The data set, or None if missing or (when ``owner_id`` is given) someone else's."""
        with self._begin() as s:
            query = select(Dataset).where(Dataset.id == dataset_id)
            if owner_id is not None:
                query = query.where(Dataset.owner_id == owner_id)
            return s.scalar(query)

    def list_datasets(self, owner_id: int | None = None) -> list[Dataset]:
        """Data sets, newest first; every owner's when ``owner_id`` is None."""
        with self._begin() as s:
            query = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id)
            if owner_id is not None:
                query = query.where(Dataset.owner_id == owner_id)
            return list(s.scalars(query))

    def delete_dataset(
        self, dataset_id: str, owner_id: int | None = None, *, remove_file: Callable[[str], object] | None = None
    ) -> Dataset | None:
        """Delete a data set row unless a queued or running job uses it.

        Args:
            remove_file: removes the stored file by key; called, under the content's lock and before the
                commit, only when no other row (any owner) still points at it.

        Returns:
            The deleted row, or None if there was none (or it is someone else's).

        Raises:
            DatasetInUse: a queued or running job uses it.
        """
        dataset = self.get_dataset(dataset_id, owner_id)
        if dataset is None:
            return None
        active = exists().where(Job.dataset_id == dataset_id, Job.state.in_(ACTIVE_STATES))
        with self._begin() as s:
            self._lock_content(s, dataset.sha256)
            # One statement decides, so a job submitted meanwhile either blocks this or fails its FK.
            deleted = s.execute(
                delete(Dataset).where(Dataset.id == dataset_id, ~active).execution_options(synchronize_session=False)
            ).rowcount
            shared = s.scalar(select(exists().where(Dataset.storage_key == dataset.storage_key)))
            if deleted == 1 and not shared and remove_file is not None:
                remove_file(dataset.storage_key)
        if deleted == 1:
            return dataset
        if self.get_dataset(dataset_id, owner_id) is None:
            return None
        raise DatasetInUse(f"data set {dataset_id} is used by a queued or running job; cancel it first")

    def _lock_content(self, s: Session, sha256: str) -> None:
        """Serialize the row and file changes of one content address across processes until commit.

        PostgreSQL: a transaction-scoped advisory lock on the hash. SQLite: the transaction's first write
        takes the database's write lock, so both callers write before they look or touch the file.
        """
        if self.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int(sha256[:15], 16)})

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
        now: dt.datetime | None = None,
    ) -> Job:
        """Queue a job, unless the owner already has ``max_active`` queued or running jobs.

        ``notify``: the URLs told when the job ends (None: the owner's defaults; []: none).

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
                select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.state.in_(ACTIVE_STATES))
            )
            if active >= max_active:
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
        }
        if gpu is not None:
            values["gpu"] = gpu
        with self._begin() as s:
            if self.is_postgres:
                s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            claimed = s.execute(
                update(Job).where(runnable).values(**values).execution_options(synchronize_session=False)
            ).rowcount
            if claimed != 1:
                return None
            job = s.get(Job, job_id, populate_existing=True)
            assert job is not None
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
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                    .execution_options(synchronize_session=False)
                ).rowcount
                == 1
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (poll it with each lease renewal)."""
        with self._begin() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

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
                s.execute(
                    update(Job)
                    .where(condition)
                    .values(last_progress=progress)
                    .execution_options(synchronize_session=False)
                ).rowcount
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
            done = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if done != 1:
                return False
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
            changed = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED)
                .values(state=INTERRUPTED, finished_at=now, error_reason=reason, error_detail=detail)
                .execution_options(synchronize_session=False)
            ).rowcount
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
            cancelled = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED)
                .values(state=CANCELLED, finished_at=now, error_reason=_CANCELLED_REASON, error_detail=detail)
                .execution_options(synchronize_session=False)
            ).rowcount
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
        cleared = {"lease_owner": None, "lease_expires_at": None}
        undispatched = {"gpu": None, "dispatched_at": None, **_NOT_WAITING}  # the dispatcher places it anew
        steps = (
            (CANCELLED, Job.cancel_requested.is_(True), {"finished_at": now, "error_reason": _CANCELLED_REASON}),
            (QUEUED, Job.attempts < Job.max_attempts, undispatched),
            (INTERRUPTED, Job.attempts >= Job.max_attempts, {"finished_at": now, "error_reason": reason}),
        )
        for new_state, condition, extra in steps:
            values = {"state": new_state, **cleared, **extra}
            if new_state == INTERRUPTED:
                values["error_detail"] = f"{detail or reason}; no attempts left"
            changed = s.execute(
                update(Job).where(held, condition).values(**values).execution_options(synchronize_session=False)
            ).rowcount
            if changed == 1:
                event_reason = reason if new_state != CANCELLED else _CANCELLED_REASON
                self._append(s, job_id, _state_event(new_state, event_reason, detail, None), now)
                return new_state
        return None

    # ── notifications (worker/notify.py): an outbox flag set with every terminal state ──
    def claim_notifications(self, limit: int = 100) -> list[Job]:
        """Take jobs whose end was not yet handed to the notify queue; each is returned to one caller only."""
        with self._begin() as s:
            pending = list(s.scalars(select(Job.id).where(Job.notify_pending.is_(True)).order_by(Job.id).limit(limit)))
        claimed = []
        for job_id in pending:
            with self._begin() as s:
                won = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.notify_pending.is_(True))
                    .values(notify_pending=False)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if won == 1:
                    claimed.append(s.get(Job, job_id, populate_existing=True))
        return [job for job in claimed if job is not None]

    def mark_notify_pending(self, job_id: str) -> None:
        """Put a claimed job's notifications back (the queue was unreachable): the next pass takes them."""
        with self._begin() as s:
            s.execute(
                update(Job).where(Job.id == job_id).values(notify_pending=True).execution_options(
                    synchronize_session=False
                )
            )

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
            held = s.execute(
                update(DispatchLock)
                .where(DispatchLock.id == 1)
                .values(held_by=holder, held_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
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
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at == dispatched_at)
                    .values(gpu=None, dispatched_at=None, dispatch_note=note, waiting_reason=reason)
                    .execution_options(synchronize_session=False)
                ).rowcount
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
            changed = s.execute(
                update(Gpu).where(Gpu.uuid == uuid).values(**values).execution_options(synchronize_session=False)
            ).rowcount
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

    # ── model operations (evaluate, predict, export on a finished job) ──
    def create_operation(
        self, job_id: str, owner_id: int, kind: str, request: dict[str, Any], *, now: dt.datetime | None = None
    ) -> Operation:
        """Record a queued operation on job ``job_id`` (the caller checked the job is finished and theirs)."""
        with self._begin() as s:
            operation = Operation(
                id=new_id("op"),
                job_id=job_id,
                owner_id=owner_id,
                kind=kind,
                state=QUEUED,
                request=request,
                created_at=now or utcnow(),
            )
            s.add(operation)
            s.flush()
            s.refresh(operation)
            return operation

    def get_operation(self, operation_id: str, job_id: str | None = None) -> Operation | None:
        """The operation, or None if missing or (when ``job_id`` is given) another job's."""
        with self._begin() as s:
            query = select(Operation).where(Operation.id == operation_id)
            if job_id is not None:
                query = query.where(Operation.job_id == job_id)
            return s.scalar(query)

    def start_operation(self, operation_id: str, *, now: dt.datetime | None = None) -> Operation | None:
        """Mark a queued operation running and return it; None when it is not queued (a second delivery
        of its task, or it ended already), so that delivery does nothing."""
        with self._begin() as s:
            started = s.execute(
                update(Operation)
                .where(Operation.id == operation_id, Operation.state == QUEUED)
                .values(state=RUNNING, started_at=now or utcnow())
            ).rowcount
            return s.get(Operation, operation_id) if started else None

    def finish_operation(
        self,
        operation_id: str,
        *,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
        detail: str | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """End a running operation: succeeded with ``result``, or failed with ``reason`` and ``detail``."""
        state = FAILED if reason else SUCCEEDED
        with self._begin() as s:
            return bool(
                s.execute(
                    update(Operation)
                    .where(Operation.id == operation_id, Operation.state == RUNNING)
                    .values(
                        state=state,
                        result=result,
                        error_reason=reason,
                        error_detail=detail,
                        finished_at=now or utcnow(),
                    )
                ).rowcount
            )

    # ── events ──
    def append_event(self, job_id: str, event_data: dict[str, Any], *, now: dt.datetime | None = None) -> int:
        """Store one job event (a trainer event, as parsed from its stdout) for SSE replay.

        Returns:
            Its sequence number: 1, 2, 3, ... per job, never reused.
        """
        now = now or utcnow()
        with self._begin() as s:
            return self._append(s, job_id, event_data, now)

    def _append(self, s: Session, job_id: str, event_data: dict[str, Any], now: dt.datetime) -> int:
        # The counter on the job row is bumped first: that write serialises appenders for this job.
        bumped = s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(last_event_seq=Job.last_event_seq + 1)
            .execution_options(synchronize_session=False)
        ).rowcount
        if bumped != 1:
            raise KeyError(f"job {job_id} does not exist")
        seq = s.scalar(select(Job.last_event_seq).where(Job.id == job_id))
        if event_data.get("event") == "state" and event_data.get("state") in TERMINAL_STATES:
            # Every terminal transition passes here, in its own transaction: the notification outbox.
            s.execute(
                update(Job).where(Job.id == job_id).values(notify_pending=True).execution_options(
                    synchronize_session=False
                )
            )
        payload = dict(event_data)
        payload.setdefault("time", now.timestamp())
        s.add(JobEvent(job_id=job_id, seq=seq, time=now, event=payload))
        s.flush()
        return int(seq)

    def events_since(self, job_id: str, after_seq: int = 0, *, limit: int = 500) -> list[JobEvent]:
        """The job's events with ``seq > after_seq``, oldest first, at most ``limit``."""
        with self._begin() as s:
            return list(
                s.scalars(
                    select(JobEvent)
                    .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                    .order_by(JobEvent.seq)
                    .limit(limit)
                )
            )


def _state_event(state: str, reason: str | None, detail: str | None, exit_code: int | None) -> dict[str, Any]:
    event_data: dict[str, Any] = {"event": "state", "state": state}
    if reason is not None:
        event_data["reason"] = reason
    if detail is not None:
        event_data["detail"] = detail
    if exit_code is not None:
        event_data["exit_code"] = exit_code
    return event_data


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
