"""The job database shared by the API and the workers: users, data sets, jobs, their leases and events.

SQLite (WAL, foreign keys, busy timeout) by default, PostgreSQL by URL (``postgresql+psycopg://``).
Every public method of :class:`Database` is one short transaction. Functions that two workers may race
on (``take_lease``, ``requeue_expired``, ``finish_job``, ...) decide with a single guarded
``UPDATE ... WHERE <expected state>`` and look at its row count, which is atomic on both engines;
PostgreSQL additionally locks the row first with ``SELECT ... FOR UPDATE``. On SQLite the first
statement of every writing transaction is a write, so it takes the write lock (waiting out the busy
timeout) instead of failing to upgrade a read snapshot.

Job states::

    queued ──dispatch──▶ queued+dispatched ──take_lease──▶ running ──finish_job──▶ succeeded | failed | ...
      ▲   (gpu, dispatched_at set)                           │
      └──requeue_expired / requeue_job (gpu, dispatched_at cleared)──┘

``failed`` is the job's own fault (bad spec, out of memory, time limit); ``interrupted`` is the
infrastructure's (worker lost, attempts exhausted, queue unreachable).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from core.errors import GpuyardError
from core.states import ACTIVE_STATES, CANCELLED, INTERRUPTED, JOB_STATES, QUEUED, RUNNING, TERMINAL_STATES

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


# ── errors ────────────────────────────────────────────────────────────────────────────────────────────
class JobDBError(GpuyardError):
    """Base of the job database's refusals.

    Hierarchy::

        JobDBError
        ├── DatabaseUnavailable   the database cannot be reached (translated from SQLAlchemy)
        ├── SchemaError           the schema is newer than this code, or unversioned
        ├── UserExists            a user name is taken
        ├── UnknownDataset        a job names a data set that does not exist
        ├── DatasetInUse          a data set still has queued or running jobs
        └── ActiveJobLimit        a user already has the maximum of queued + running jobs
    """

    code = "job_db_error"


class DatabaseUnavailable(JobDBError):
    code = "database_unavailable"


class SchemaError(JobDBError):
    code = "schema_error"


class UserExists(JobDBError):
    code = "user_exists"


class UnknownDataset(JobDBError):
    code = "dataset_not_found"


class DatasetInUse(JobDBError):
    code = "dataset_in_use"


class ActiveJobLimit(JobDBError):
    code = "too_many_active_jobs"


# ── models ────────────────────────────────────────────────────────────────────────────────────────────
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


class SchemaVersion(Base):
    """One row per applied migration."""

    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    description: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("FALSE"))


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

    owner: Mapped[User] = relationship(lazy="joined")

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


GPU_ACTIVE = "active"


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


# ── migrations ────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Migration:
    """One schema step. ``apply`` runs inside the migration transaction, holding the migration lock."""

    version: int
    description: str
    apply: Any  # Callable[[Connection], None]


def _v1_initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _v2_gpus(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatched_at TIMESTAMP"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatch_note VARCHAR(300)"))
    Gpu.__table__.create(conn)
    DispatchLock.__table__.create(conn)


def _v3_users_disabled(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE"))


# Append only. A fresh database gets the models' current tables at once and is stamped with the last
# version (so these steps must leave an old database exactly where create_all leaves a new one).
MIGRATIONS: list[Migration] = [
    Migration(1, "users, datasets, jobs, job_events", _v1_initial),
    Migration(2, "gpus, dispatch_lock; jobs.dispatched_at, jobs.dispatch_note", _v2_gpus),
    Migration(3, "users.disabled", _v3_users_disabled),
]
LATEST_VERSION = MIGRATIONS[-1].version
_PG_MIGRATION_LOCK = 0x67707964  # "gpyd": any constant shared by every process migrating this DB
_PG_DISPATCH_LOCK = 0x67707965


# ── results ───────────────────────────────────────────────────────────────────────────────────────────
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


# ── the database ──────────────────────────────────────────────────────────────────────────────────────
def make_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine for ``url``: SQLite gets WAL, foreign keys and a busy timeout; PostgreSQL an optional schema.

    Args:
        url: SQLAlchemy URL, ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``.
        schema: PostgreSQL only: put this schema first on the search path (tests use a fresh one each).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "postgresql":
        connect_args = {"options": f"-csearch_path={schema}"} if schema else {}
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(f"Expected a sqlite:// or postgresql+psycopg:// database URL. Received: {url!r}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses at most the last commit
    finally:
        cursor.close()


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
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(SchemaVersion.__tablename__):
                return None
            return conn.scalar(select(func.max(SchemaVersion.version)))

    def migrate(self) -> int:
        """Bring the schema to :data:`LATEST_VERSION`; safe when several processes start at once.

        Returns:
            The schema version now applied.

        Raises:
            SchemaError: the database is newer than this code, or holds our tables without a version.
        """
        with self.engine.connect() as conn:
            if self.is_postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            else:
                # pysqlite opens transactions lazily; take the write lock now so a second process waits.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            SchemaVersion.__table__.create(conn, checkfirst=True)
            current = conn.scalar(select(func.max(SchemaVersion.version)))
            if current is None:
                if inspect(conn).has_table(Job.__tablename__):
                    raise SchemaError("the database has gpuyard tables but no schema_version row")
                Base.metadata.create_all(conn)
                conn.execute(
                    SchemaVersion.__table__.insert().values(
                        version=LATEST_VERSION, description="created at this version", applied_at=utcnow()
                    )
                )
            elif current > LATEST_VERSION:
                raise SchemaError(f"the database is at schema version {current}; this code knows {LATEST_VERSION}")
            else:
                for migration in MIGRATIONS:
                    if migration.version > current:
                        migration.apply(conn)
                        conn.execute(
                            SchemaVersion.__table__.insert().values(
                                version=migration.version,
                                description=migration.description,
                                applied_at=utcnow(),
                            )
                        )
            conn.commit()
        return LATEST_VERSION

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
        """Disable a user (their token stops working at its next request) or enable them again; None if no such user."""
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

    def storage_key_in_use(self, storage_key: str) -> bool:
        """Whether any data set row (any owner) still points at this stored file."""
        with self._begin() as s:
            return s.scalar(select(exists().where(Dataset.storage_key == storage_key))) or False

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
        now: dt.datetime | None = None,
    ) -> Job:
        """Queue a job, unless the owner already has ``max_active`` queued or running jobs.

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
                attempts=0,
                max_attempts=max_attempts,
                queued_at=now,
                cancel_requested=False,
                last_event_seq=0,
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
        set when given, and a ``{"event": "state", "state": "running", "attempt": n}`` event.

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
        now: dt.datetime | None = None,
    ) -> str | None:
        """Hand a running job back (e.g. the worker is shutting down): queued again, or interrupted when
        it has used all its attempts, or cancelled when a cancel was requested.

        Returns:
            The job's new state, or None when ``owner`` does not hold it.
        """
        now = now or utcnow()
        with self._begin() as s:
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
                .values(state=CANCELLED, finished_at=now, error_reason="cancelled", error_detail=detail)
                .execution_options(synchronize_session=False)
            ).rowcount
            if cancelled == 1:
                self._append(s, job_id, _state_event(CANCELLED, "cancelled", detail, None), now)
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
        undispatched = {"gpu": None, "dispatched_at": None, "dispatch_note": None}  # the dispatcher places it anew
        steps = (
            (CANCELLED, Job.cancel_requested.is_(True), {"finished_at": now, "error_reason": "cancelled"}),
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
                event_reason = reason if new_state != CANCELLED else "cancelled"
                self._append(s, job_id, _state_event(new_state, event_reason, detail, None), now)
                return new_state
        return None

    # ── dispatch (worker/dispatch.py decides; these read and mark under the dispatch lock) ──
    @contextlib.contextmanager
    def dispatch_lock(self, holder: str, now: dt.datetime | None = None) -> Iterator[Session]:
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
            yield s

    def undispatch(self, job_id: str, dispatched_at: dt.datetime, note: str) -> bool:
        """Take back a dispatch whose task could not be sent (still queued, same dispatch): the next
        dispatch pass places the job again."""
        with self._begin() as s:
            return (
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == QUEUED, Job.dispatched_at == dispatched_at)
                    .values(gpu=None, dispatched_at=None, dispatch_note=note)
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

    def queue_position(self, job_id: str) -> int | None:
        """1-based place of a queued, not yet dispatched job in dispatch order (priority, then FIFO)."""
        with self._begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != QUEUED or job.dispatched_at is not None:
                return None
            ahead = s.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.state == QUEUED,
                    Job.dispatched_at.is_(None),
                    or_(
                        Job.priority > job.priority,
                        and_(
                            Job.priority == job.priority,
                            or_(
                                Job.queued_at < job.queued_at,
                                and_(Job.queued_at == job.queued_at, Job.id < job.id),
                            ),
                        ),
                    ),
                )
            )
            return int(ahead or 0) + 1

    # ── GPUs ──
    def register_gpu(
        self, uuid: str, *, host: str, index: int, name: str, memory_total_bytes: int, now: dt.datetime | None = None
    ) -> Gpu:
        """Record (or refresh) a GPU a worker serves; its drain and quarantine flags are kept."""
        now = now or utcnow()
        values = {"host": host, "index": index, "name": name, "memory_total_bytes": memory_total_bytes}
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
