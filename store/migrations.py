"""The job database's schema, owned by Alembic: upgrade, inspect, and refuse a database that is behind.

Revisions live in store/alembic/versions/ (one per schema change; ``0006`` is the base, the schema gpuyard
had when it moved to Alembic). A database made before that has a home-made ``schema_version`` table:
:func:`upgrade` brings it to version 6 once (store/legacy.py), stamps it at the base and goes on to head.

Who migrates: only ``gpuyard db upgrade`` (:func:`upgrade`). Every other process (``gpuyard up``, the API,
the workers, the janitor, ``gpuyard users``) calls :func:`ensure_schema`: an empty database is created at
head (nothing to lose), one at head is used, and one behind is refused with :class:`SchemaBehind`, whose
message names the command. Migrating data is an operator's deliberate step, done once, not a race
between processes starting.

gpuyard's revision lives in its own table, ``gpuyard_alembic_version``: Optuna (worker/studies.py) keeps its
tables in the same database and its schema revision in Alembic's default ``alembic_version``. A database
made before the rename (gpuyard's revision in ``alembic_version``) is still recognised, and :func:`upgrade`
moves the revision over once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from store import legacy
from store.errors import SchemaBehind, SchemaError
from store.tables import Job

SCRIPT_LOCATION = Path(__file__).parent / "alembic"
BASE_REVISION = "0006"
UPGRADE_COMMAND = "gpuyard db upgrade"
#: Where gpuyard's Alembic keeps its revision (not Alembic's default ``alembic_version``: Optuna's).
VERSION_TABLE = "gpuyard_alembic_version"
#: The version table gpuyard used before the rename; Optuna's once gpuyard has moved out.
OLD_VERSION_TABLE = "alembic_version"
_GPUYARD_REVISION = re.compile(r"\d{4}")  # `alembic revision --rev-id 0007`; Optuna's are "v3.2.0.a" and such
# Optuna's own tables in the job database (optuna/storages/_rdb/models.py): not gpuyard's schema.
_OPTUNA_TABLES = re.compile(r"studies|trials|version_info|alembic_version|study_\w+|trial_\w+")
_PG_MIGRATION_LOCK = 0x67707964  # "gpyd": any constant shared by every process migrating this DB


def compare_type(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """Autogenerate's type comparison, knowing one harmless difference: the pre-Alembic steps added some
    timestamps as ``TIMESTAMP``, which SQLite keeps by name where a new table says ``DATETIME`` (the same
    storage; SQLAlchemy's DateTime reads both). And on SQLite a VARCHAR's length, which SQLite does not
    enforce (revision 0008 lengthens ``jobs.waiting_reason`` on PostgreSQL only)."""
    if isinstance(metadata_type, sa.TypeDecorator):
        metadata_type = metadata_type.impl_instance
    if (
        context.dialect.name == "sqlite"
        and isinstance(inspected_type, sa.String)
        and isinstance(metadata_type, sa.String)
        and inspected_type.length != metadata_type.length
    ):
        return False
    if isinstance(inspected_type, sa.DateTime) and isinstance(metadata_type, sa.DateTime):
        return False
    return None  # the default comparison


def is_gpuyard_object(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate's ``include_name``: compare gpuyard's tables, never Optuna's (which live beside them)."""
    return not (type_ == "table" and name is not None and _OPTUNA_TABLES.fullmatch(name) is not None)


def migration_context(conn: Connection) -> MigrationContext:
    """A migration context on ``conn`` reading gpuyard's version table."""
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})


def _old_table_revision(conn: Connection) -> str | None:
    """gpuyard's revision in the old version table, if it holds one (and not Optuna's)."""
    if not inspect(conn).has_table(OLD_VERSION_TABLE):
        return None
    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) == 1 and _GPUYARD_REVISION.fullmatch(heads[0]):
        return heads[0]
    return None


def _current_revision(conn: Connection) -> str | None:
    if inspect(conn).has_table(VERSION_TABLE):
        return migration_context(conn).get_current_revision()
    return _old_table_revision(conn)


def _move_version_table(conn: Connection) -> None:
    """Move gpuyard's revision out of ``alembic_version`` (where gpuyard kept it before) into its own table."""
    if inspect(conn).has_table(VERSION_TABLE):
        return
    revision = _old_table_revision(conn)
    if revision is None:
        return
    command.stamp(alembic_config(conn), revision)  # creates gpuyard_alembic_version (env.py names it)
    conn.execute(text(f"DROP TABLE {OLD_VERSION_TABLE}"))


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the store, built in code (no alembic.ini needed, installed or not).

    Args:
        connection: run the migrations on this connection, inside its transaction (env.py reads it).
    """
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # `alembic revision --rev-id 0007 -m studies` writes versions/v0007_studies.py
    config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The revisions this code knows."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = script_directory().get_current_head()
    assert head is not None  # the base revision always exists
    return head


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: ``revision`` (Alembic), ``legacy_version`` (pre-Alembic) or neither (empty)."""

    revision: str | None
    legacy_version: int | None
    has_tables: bool

    @property
    def is_empty(self) -> bool:
        return self.revision is None and self.legacy_version is None and not self.has_tables

    def describe(self) -> str:
        if self.revision is not None:
            return f"revision {self.revision}"
        if self.legacy_version is not None:
            return f"home-made schema version {self.legacy_version} (before Alembic)"
        return "gpuyard tables without a schema revision" if self.has_tables else "empty"


def _state(conn: Connection) -> SchemaState:
    return SchemaState(
        revision=_current_revision(conn),
        legacy_version=legacy.legacy_version(conn),
        has_tables=inspect(conn).has_table(Job.__tablename__),
    )


def schema_state(engine: Engine) -> SchemaState:
    """Where the database at ``engine`` stands (reads only)."""
    with engine.connect() as conn:
        return _state(conn)


@contextlib.contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the migration lock, committed on success: processes migrate one at a time."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            yield conn
            conn.commit()
            return
        # SQLite changes a foreign key or a CHECK by copying the table (batch mode); with foreign keys on,
        # dropping the old jobs table would cascade to job_events and operations. So they are off while
        # migrating (a pragma that only takes effect outside a transaction), and checked before the commit
        # (https://sqlite.org/lang_altertable.html#otheralter).
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            # pysqlite opens transactions lazily; take the write lock now so a second process waits.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise SchemaError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
            conn.commit()
        finally:
            conn.rollback()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


def _check_known(state: SchemaState) -> None:
    if state.revision is not None and state.revision not in {s.revision for s in script_directory().walk_revisions()}:
        raise SchemaError(
            f"the database is at revision {state.revision}, which this code does not know (head {head_revision()}): "
            "it was migrated by a newer gpuyard"
        )
    if state.revision is None and state.legacy_version is None and state.has_tables:
        raise SchemaError(
            f"the database has gpuyard tables but neither a {VERSION_TABLE} nor a schema_version table"
        )


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the database to ``revision`` (default: head), from any earlier gpuyard's schema or from empty.

    Returns:
        The revision now applied.

    Raises:
        SchemaError: the database is newer than this code, or holds our tables without a version.
    """
    with _locked(engine) as conn:
        _move_version_table(conn)
        state = _state(conn)
        _check_known(state)
        if legacy.upgrade_legacy(conn) is not None:
            command.stamp(alembic_config(conn), BASE_REVISION)
        command.upgrade(alembic_config(conn), revision)
        now = migration_context(conn).get_current_revision()
    assert now is not None
    return now


def ensure_schema(engine: Engine) -> str:
    """Create an empty database at head; accept one at head; refuse any other.

    Returns:
        The head revision.

    Raises:
        SchemaBehind: the database is at an older revision or a pre-Alembic version (the message names
            ``gpuyard db upgrade``).
        SchemaError: the database is newer than this code, or holds our tables without a version.
    """
    head = head_revision()
    state = schema_state(engine)
    if state.revision == head:
        return head
    if state.is_empty:
        with _locked(engine) as conn:  # several processes may start on one empty database at once
            if _state(conn).is_empty:
                command.upgrade(alembic_config(conn), "head")
        return ensure_schema(engine)
    _check_known(state)
    raise SchemaBehind(
        f"the job database is at {state.describe()}; this gpuyard needs revision {head}. "
        f"Back it up, then run `{UPGRADE_COMMAND}` (with the same GPUYARD_DATABASE_URL or GPUYARD_DATA_DIR)"
    )
