"""The home-made schema steps of gpuyard before Alembic (``schema_version`` 1 to 6), kept to upgrade old databases.

A database made by an earlier gpuyard has a ``schema_version`` table. :func:`upgrade_legacy` reads it once,
applies the steps it lacks, and drops the table; :mod:`store.migrations` then stamps the database at Alembic's
base revision (``0006``, the schema of version 6). Nothing new goes here: schema changes are Alembic
revisions (store/alembic/versions/). The steps use frozen table definitions, not the models, so a later
revision that changes a model cannot change what an old step creates.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from store.errors import SchemaError

LEGACY_TABLE = "schema_version"
LAST_LEGACY_VERSION = 6

_frozen = sa.MetaData()
# Only their keys: the foreign keys of the tables below name them (never created from here).
sa.Table("users", _frozen, sa.Column("id", sa.Integer, primary_key=True))
sa.Table("jobs", _frozen, sa.Column("id", sa.String(32), primary_key=True))
# gpus as version 2 created it (version 4 adds backends).
_GPUS_V2 = sa.Table(
    "gpus",
    _frozen,
    sa.Column("uuid", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("memory_total_bytes", sa.BigInteger, nullable=False),
    sa.Column("registered_at", sa.DateTime, nullable=False),
    sa.Column("draining", sa.Boolean, nullable=False),
    sa.Column("draining_since", sa.DateTime),
    sa.Column("draining_by", sa.String(64)),
    sa.Column("quarantined", sa.Boolean, nullable=False),
    sa.Column("quarantined_since", sa.DateTime),
    sa.Column("quarantine_reason", sa.Text),
)
_DISPATCH_LOCK_V2 = sa.Table(
    "dispatch_lock",
    _frozen,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("held_by", sa.String(255)),
    sa.Column("held_at", sa.DateTime),
)
_STATES_V6 = "'queued','running','succeeded','failed','cancelled','interrupted'"
_OPERATIONS_V6 = sa.Table(
    "operations",
    _frozen,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("error_reason", sa.String(64)),
    sa.Column("error_detail", sa.Text),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.CheckConstraint(f"state IN ({_STATES_V6})", name="ck_operations_state"),
)


def _v2_gpus(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatched_at TIMESTAMP"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN dispatch_note VARCHAR(300)"))
    _GPUS_V2.create(conn)
    _DISPATCH_LOCK_V2.create(conn)


def _v3_users_disabled(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE"))


def _v4_sharing(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN max_priority INTEGER NOT NULL DEFAULT 0"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN queue_position INTEGER"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN waiting_reason VARCHAR(32)"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN estimated_start_at TIMESTAMP"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN memory_fraction_auto BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN suggested_memory_fraction FLOAT"))
    # gpuyard 4 and 5 ran version 2 from the models of their day, which already had gpus.backends.
    if "backends" not in {c["name"] for c in inspect(conn).get_columns("gpus")}:
        conn.execute(text("ALTER TABLE gpus ADD COLUMN backends JSON"))


def _v5_notify(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE users ADD COLUMN webhook_secret VARCHAR(64)"))
    conn.execute(text("ALTER TABLE users ADD COLUMN notify JSON"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN notify JSON"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN notify_pending BOOLEAN NOT NULL DEFAULT FALSE"))


def _v6_operations(conn: Connection) -> None:
    _OPERATIONS_V6.create(conn)


# Version 1 (users, datasets, jobs, job_events) was only ever created whole, never reached by a step.
LEGACY_STEPS: dict[int, Callable[[Connection], None]] = {
    2: _v2_gpus,
    3: _v3_users_disabled,
    4: _v4_sharing,
    5: _v5_notify,
    6: _v6_operations,
}


def legacy_version(conn: Connection) -> int | None:
    """The home-made schema version of a database made before Alembic, or None when it has no such table."""
    if not inspect(conn).has_table(LEGACY_TABLE):
        return None
    version = conn.scalar(text(f"SELECT max(version) FROM {LEGACY_TABLE}"))
    if version is None:
        raise SchemaError(f"the database has an empty {LEGACY_TABLE} table: it was never migrated by gpuyard")
    return int(version)


def upgrade_legacy(conn: Connection) -> int | None:
    """Bring a pre-Alembic database to home-made version 6 and drop its ``schema_version`` table.

    Runs inside the caller's transaction (which holds the migration lock).

    Returns:
        The version the database was at, or None when it was not a pre-Alembic database.

    Raises:
        SchemaError: the version is one no gpuyard release wrote.
    """
    version = legacy_version(conn)
    if version is None:
        return None
    if not 1 <= version <= LAST_LEGACY_VERSION:
        raise SchemaError(
            f"the database is at home-made schema version {version}; gpuyard releases wrote 1 to {LAST_LEGACY_VERSION}"
        )
    for step_version in range(version + 1, LAST_LEGACY_VERSION + 1):
        LEGACY_STEPS[step_version](conn)
    conn.execute(text(f"DROP TABLE {LEGACY_TABLE}"))
    return version
