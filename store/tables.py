"""The job database's tables (SQLAlchemy ORM): users, data sets, jobs, their events, GPUs, the dispatch lock,
and the model operations (evaluate, predict, export) run on finished jobs."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.states import CANCELLED, JOB_STATES, QUEUED, TERMINAL_STATES

_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o/1/l: ids get read aloud and typed


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC (the only kind of datetime this module stores)."""
    return dt.datetime.now(dt.UTC)


def new_id(prefix: str) -> str:
    """A short random id such as ``job_k3v9x2m7qpta``: 12 characters, 60 bits."""
    return prefix + "_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def hash_token(token: str) -> str:
    """The stored form of a bearer token: its SHA-256 hex digest (tokens are random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC, returns aware UTC: the same on SQLite (no time zones) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Expected a timezone-aware datetime. Received: {value!r}")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}  # noqa: RUF012


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("FALSE"))
    # The highest priority this user may give a job (an admin sets it: `gpuyard users set-priority`).
    max_priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Notifications (worker/notify.py): the key that signs this user's webhooks (HMAC-SHA256; kept in clear,
    # as a webhook receiver needs the same key) and the URLs of jobs that name none of their own.
    webhook_secret: Mapped[str | None] = mapped_column(String(64))
    notify: Mapped[list[str] | None] = mapped_column(JSON)
    # Whether this user may submit ``resources.preemptible: false`` (an admin sets it: ``--may-pin``).
    may_pin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("FALSE"))
    # GPU-hour quota (budget fraction × hours) per ``quota_period`` (week | month); None: no quota.
    quota_gpu_hours: Mapped[float | None] = mapped_column(Float)
    quota_period: Mapped[str | None] = mapped_column(String(8))


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner_id", "sha256", name="uq_datasets_owner_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    summary: Mapped[dict[str, Any]]
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('" + "','".join(JOB_STATES) + "')", name="ck_jobs_state"),
        Index("ix_jobs_owner_state", "owner_id", "state"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
        Index("ix_jobs_queued_at_id", "queued_at", "id"),
        # One job per trial of a study: a driver that crashed between Optuna's ask and the job's creation
        # and tries again cannot make a second one (worker/studies.py).
        Index("uq_jobs_study_trial", "study_id", "trial_number", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # SET NULL: a finished job outlives its data set; deleting one with active jobs is refused first.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    gpu: Mapped[str | None] = mapped_column(String(64))
    queued_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[dt.datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_progress: Mapped[dict[str, Any] | None]
    error_reason: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    peak_gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Set by the dispatcher (worker/dispatch.py) with ``gpu`` before it sends the task; cleared on requeue.
    dispatched_at: Mapped[dt.datetime | None]
    dispatch_note: Mapped[str | None] = mapped_column(String(300))
    # The queue explained (worker/dispatch.py writes them each pass while the job waits; cleared on dispatch).
    queue_position: Mapped[int | None] = mapped_column(Integer)
    waiting_reason: Mapped[str | None] = mapped_column(String(120))
    estimated_start_at: Mapped[dt.datetime | None]
    # Memory sizing: whether gpuyard chose memory_fraction ("auto"), and what the measured peak suggests.
    memory_fraction_auto: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("FALSE"))
    suggested_memory_fraction: Mapped[float | None] = mapped_column(Float)
    # The job's own notify URLs (None: its owner's defaults); notify_pending is set with the terminal state,
    # in the same transaction, and cleared by whoever hands the notifications to the queue.
    notify: Mapped[list[str] | None] = mapped_column(JSON)
    notify_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("FALSE"))
    # A study's trial (worker/studies.py): its study, its Optuna trial number, and why it is being pruned
    # (set with cancel_requested; the stop then ends in ``pruned``, not ``cancelled``).
    study_id: Mapped[str | None] = mapped_column(ForeignKey("tuning_studies.id", ondelete="SET NULL"), index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer)
    prune_reason: Mapped[str | None] = mapped_column(String(64))
    prune_detail: Mapped[str | None] = mapped_column(Text)
    # Preemption (worker/preemption.py): how often the job was stopped for a higher-priority one (attempts not
    # counted), the job it was last stopped for (set with the request; a running job with it set is being
    # stopped; cleared when it starts again) and when that was asked.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    preempted_by: Mapped[str | None] = mapped_column(String(32))
    preempted_at: Mapped[dt.datetime | None]

    owner: Mapped[User] = relationship(lazy="joined")

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


#: A study's states: ``active`` while it asks or runs trials, then ``finished`` or ``cancelled``.
STUDY_ACTIVE = "active"
STUDY_FINISHED = "finished"
STUDY_CANCELLED = CANCELLED  # the word of the job state
STUDY_STATES = (STUDY_ACTIVE, STUDY_FINISHED, STUDY_CANCELLED)


class Study(Base):
    """A search: a base spec, a space and an objective, run as trial jobs (worker/studies.py).

    ``request`` is the study as submitted and validated (service/schemas.py ``StudyCreate``); Optuna keeps
    its own trials in its own tables of the same database, under the name ``id``. ``driver`` and
    ``driver_until`` are a short lease: one process advances a study at a time.
    """

    # Not "studies": Optuna's own tables (studies, trials, ...) live in the same database under its names.
    __tablename__ = "tuning_studies"
    __table_args__ = (CheckConstraint("state IN ('" + "','".join(STUDY_STATES) + "')", name="ck_studies_state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=STUDY_ACTIVE)
    request: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    driver: Mapped[str | None] = mapped_column(String(255))
    driver_until: Mapped[dt.datetime | None]

    owner: Mapped[User] = relationship(lazy="joined")


class JobAttempt(Base):
    """One attempt of a job on its GPU: opened with the lease, closed when the attempt ends (usage accounting).

    Written in the same transactions as the job's state changes, so a restart of any process neither loses nor
    double-counts usage: GPU-seconds are ``memory_fraction × (ended_at or now − started_at)``.
    """

    __tablename__ = "job_attempts"
    __table_args__ = (Index("ix_job_attempts_started", "started_at"), Index("ix_job_attempts_owner", "owner_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[str | None] = mapped_column(String(64))
    memory_fraction: Mapped[float] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(32))  # the job's state after it, or "preempted"


class Gpu(Base):
    """A GPU some worker registered: what it is, and the admin's and hygiene's verdicts on it.

    Live readings (memory, utilization, processes) are not here: they live in the workers' Redis
    heartbeats, which expire. This row is what every API and worker process agrees on.
    """

    __tablename__ = "gpus"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    memory_total_bytes: Mapped[int] = mapped_column(BigInteger)
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    draining_since: Mapped[dt.datetime | None]
    draining_by: Mapped[str | None] = mapped_column(String(64))
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    quarantined_since: Mapped[dt.datetime | None]
    quarantine_reason: Mapped[str | None] = mapped_column(Text)
    backends: Mapped[list[str] | None] = mapped_column(JSON)  # what its worker can run (tensorflow, jax, torch)


class DispatchLock(Base):
    """One row: dispatchers update it first, so read-decide-mark runs one dispatcher at a time."""

    __tablename__ = "dispatch_lock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    held_by: Mapped[str | None] = mapped_column(String(255))
    held_at: Mapped[dt.datetime | None]


class JobEvent(Base):
    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    event: Mapped[dict[str, Any]]


class Operation(Base):
    """One use of a finished job's model: evaluate on a data set, predict a batch, or export.

    A small record of its own (not a job row), so job listings, the dispatcher and the per-user job cap
    never see it. ``state`` takes the job states ``queued``, ``running``, ``succeeded``, ``failed``.
    """

    __tablename__ = "operations"
    __table_args__ = (CheckConstraint("state IN ('" + "','".join(JOB_STATES) + "')", name="ck_operations_state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    request: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    error_reason: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
