"""Schema versions of the job database: append-only steps, applied under a lock by :func:`migrate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.engine import Connection

from store.errors import SchemaError
from store.tables import Base, DispatchLock, Gpu, Job, JobAttempt, Operation, SchemaVersion, utcnow


@dataclass(frozen=True)
class Migration:
    """One schema step. ``apply`` runs inside the migration transaction, holding the migration lock."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _v2_gpus(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatched_at TIMESTAMP"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatch_note VARCHAR(300)"))
    Gpu.__table__.create(conn)
    DispatchLock.__table__.create(conn)


def _v3_users_disabled(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE"))


def _v4_sharing(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN max_priority INTEGER NOT NULL DEFAULT 0"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN queue_position INTEGER"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN waiting_reason VARCHAR(32)"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN estimated_start_at TIMESTAMP"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN memory_fraction_auto BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN suggested_memory_fraction FLOAT"))
    # Version 2 creates ``gpus`` from the current model, so a database migrated from 1 already has it.
    if "backends" not in {c["name"] for c in inspect(conn).get_columns("gpus")}:
        conn.execute(text("ALTER TABLE gpus ADD COLUMN backends JSON"))


def _v5_notify(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN webhook_secret VARCHAR(64)"))
    conn.execute(text("ALTER TABLE users ADD COLUMN notify JSON"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN notify JSON"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN notify_pending BOOLEAN NOT NULL DEFAULT FALSE"))


def _v6_operations(conn: Connection) -> None:
    Operation.__table__.create(conn)


def _v8_preemption(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN may_pin BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("ALTER TABLE users ADD COLUMN quota_gpu_hours FLOAT"))
    conn.execute(text("ALTER TABLE users ADD COLUMN quota_period VARCHAR(8)"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN preemptions INTEGER NOT NULL DEFAULT 0"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN preempted_by VARCHAR(32)"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN preempted_at TIMESTAMP"))
    if conn.dialect.name == "postgresql":  # "preempting <job>, <job>" (SQLite does not enforce lengths)
        conn.execute(text("ALTER TABLE jobs ALTER COLUMN waiting_reason TYPE VARCHAR(120)"))
    JobAttempt.__table__.create(conn)


# Append only. A fresh database gets the models' current tables at once and is stamped with the last
# version (so these steps must leave an old database exactly where create_all leaves a new one).
MIGRATIONS: list[Migration] = [
    Migration(1, "users, datasets, jobs, job_events", _v1_initial),
    Migration(2, "gpus, dispatch_lock; jobs.dispatched_at, jobs.dispatch_note", _v2_gpus),
    Migration(3, "users.disabled", _v3_users_disabled),
    Migration(4, "fair sharing: users.max_priority; jobs queue info and memory sizing; gpus.backends", _v4_sharing),
    Migration(5, "users.webhook_secret, users.notify; jobs.notify, jobs.notify_pending", _v5_notify),
    Migration(6, "operations (evaluate, predict, export on a finished job)", _v6_operations),
    # 7 is the studies' (another branch); the lead renumbers these as Alembic revisions at merge.
    Migration(
        8,
        "preemption, quotas, usage: users.may_pin, quota; jobs.preemptions, preempted_*; job_attempts",
        _v8_preemption,
    ),
]
LATEST_VERSION = MIGRATIONS[-1].version
_PG_MIGRATION_LOCK = 0x67707964  # "gpyd": any constant shared by every process migrating this DB


def schema_version(engine: Engine) -> int | None:
    """The applied schema version, or None on a database never migrated."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(SchemaVersion.__tablename__):
            return None
        return conn.scalar(select(func.max(SchemaVersion.version)))


def migrate(engine: Engine) -> int:
    """Bring the schema to :data:`LATEST_VERSION`; safe when several processes start at once.

    Returns:
        The schema version now applied.

    Raises:
        SchemaError: the database is newer than this code, or holds our tables without a version.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
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
                            version=migration.version, description=migration.description, applied_at=utcnow()
                        )
                    )
        conn.commit()
    return LATEST_VERSION
