"""Small helpers every test package imports (``from support import free_port, wait_for``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.data.summary import DataKeys, DatasetSummary

if TYPE_CHECKING:
    from sqlalchemy import Engine


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate`` until it is truthy; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Take the database at ``engine`` down to ``revision`` with the revisions' own ``downgrade`` (SQLite's
    foreign keys off meanwhile, as ``store.migrations.upgrade`` does): tests fill a database at head with
    today's models, then step it back to where an older gpuyard left it."""
    from alembic import command

    from store.migrations import alembic_config

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        command.downgrade(alembic_config(conn), revision)
        conn.commit()
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


# What each home-made schema version after 1 added (store/legacy.py), newest last: what a test drops to make
# a database at Alembic's base revision (0006) look like one an older gpuyard made.
_COLUMNS_ADDED = {
    2: [("jobs", "dispatched_at"), ("jobs", "dispatch_note")],
    3: [("users", "disabled")],
    4: [
        ("users", "max_priority"),
        ("jobs", "queue_position"),
        ("jobs", "waiting_reason"),
        ("jobs", "estimated_start_at"),
        ("jobs", "memory_fraction_auto"),
        ("jobs", "suggested_memory_fraction"),
    ],
    5: [("users", "webhook_secret"), ("users", "notify"), ("jobs", "notify"), ("jobs", "notify_pending")],
    6: [],
}
_TABLES_ADDED = {2: ["gpus", "dispatch_lock"], 6: ["operations"]}
RELEASED_SCHEMA_VERSIONS = (1, 2, 3, 4, 5, 6)


def rewind_schema(execute: Callable[[str], object], version: int) -> None:
    """Make a database at Alembic's base revision (0006, ``downgrade_schema(engine, BASE_REVISION)``)
    look like home-made schema ``version`` (1-6): drop later versions' columns and tables, drop
    ``gpuyard_alembic_version`` and write the ``schema_version`` table old gpuyards kept. ``execute`` runs one SQL
    statement (a DB-API cursor's or ``exec_driver_sql``); SQLite or PostgreSQL."""
    for added in range(max(_COLUMNS_ADDED), version, -1):
        for table in _TABLES_ADDED.get(added, ()):
            execute(f"DROP TABLE {table}")
        for table, column in _COLUMNS_ADDED[added]:
            execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    execute("DROP TABLE gpuyard_alembic_version")
    execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description VARCHAR(200) NOT NULL, "
        "applied_at TIMESTAMP NOT NULL)"
    )
    execute(f"INSERT INTO schema_version VALUES ({version}, 'v{version}', '2026-01-01 00:00:00')")


def digits_summary(input_shape: list[int], rows: int) -> DatasetSummary:
    """The stored summary of a digits-like data set (10 integer classes) of ``rows`` training rows."""
    return DatasetSummary(
        sha256="0" * 64,
        size_bytes=1,
        keys=DataKeys(),
        arrays={},
        rows={"train": rows},
        input_shape=input_shape,
        target="integer_labels",
        num_classes=10,
        classes=list(range(10)),
        output_dim=10,
    )
