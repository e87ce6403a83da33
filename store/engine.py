"""Engines for the job database: SQLite (WAL, foreign keys, busy timeout) or PostgreSQL (optional schema)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from store.errors import DatabaseUnavailable

# How long PostgreSQL lets a session sit idle inside an open transaction before ending it.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000


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
        # A process frozen inside a transaction (a paused container, a stopped VM) would hold its row locks
        # until it wakes, and the janitor's requeue of that very job would wait behind them: the server
        # ends such a session instead. gpuyard's transactions last milliseconds.
        options = [f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"]
        if schema:
            options.append(f"-csearch_path={schema}")
        return create_engine(parsed, pool_pre_ping=True, connect_args={"options": " ".join(options)})
    raise ValueError(f"Expected a sqlite:// or postgresql+psycopg:// database URL. Received: {url!r}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        _enter_wal(cursor)  # readers never block the one writer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses at most the last commit
    finally:
        cursor.close()


def _enter_wal(cursor: Any, tries: int = 50) -> None:
    """``PRAGMA journal_mode=WAL``, again while SQLite answers "database is locked": processes opening a new
    file at once race to switch its journal, and that switch does not wait out the busy timeout."""
    for _ in range(tries - 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.1)
    cursor.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for read-only Core statements, outside any ORM session (a hot read path pays
    for neither the session nor the identity map); database errors become :class:`DatabaseUnavailable`."""
    try:
        with engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(f"job database error: {type(exc).__name__}: {exc}") from exc
