"""The store's shared base: the engine, one transaction per method, the schema and the job events."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any, cast

from sqlalchemy import CursorResult, Result, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.exitcodes import ExitCode
from core.states import (
    TERMINAL_STATES,
)
from store import migrations
from store.engine import make_engine
from store.errors import DatabaseUnavailable
from store.tables import (
    Job,
    JobEvent,
    utcnow,
)

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


class StoreBase:
    """The connection every part of the store shares: one engine, one short transaction per method.

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

    # ── schema (store/migrations.py) ──
    def schema_state(self) -> migrations.SchemaState:
        """Where the schema stands: an Alembic revision, a pre-Alembic version, or empty."""
        return migrations.schema_state(self.engine)

    def migrate(self) -> str:
        """Bring the schema to head from any earlier gpuyard's (``gpuyard db upgrade``); safe when several
        processes run it at once. Returns the head revision."""
        return migrations.upgrade(self.engine)

    def ensure_schema(self) -> str:
        """What every process does on start: create an empty database at head, accept one at head, refuse one
        behind with :class:`store.errors.SchemaBehind` (naming ``gpuyard db upgrade``); a database that does
        not answer is :class:`DatabaseUnavailable`, as everywhere else (callers wait for it)."""
        try:
            return migrations.ensure_schema(self.engine)
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"job database unreachable: {type(exc).__name__}: {exc}") from exc

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
        bumped = rowcount(s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(last_event_seq=Job.last_event_seq + 1)
            .execution_options(synchronize_session=False)
        ))
        if bumped != 1:
            raise KeyError(f"job {job_id} does not exist")
        seq = s.scalar(select(Job.last_event_seq).where(Job.id == job_id))
        assert seq is not None  # the row was just bumped in this transaction
        if event_data.get("event") == "state" and event_data.get("state") in TERMINAL_STATES:
            # Every terminal transition passes here, in its own transaction: the notification outbox.
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(notify_pending=True)
                .execution_options(synchronize_session=False)
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


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (its result is a cursor result; the session's stub says Result)."""
    return cast(CursorResult[Any], result).rowcount


def _state_event(state: str, reason: str | None, detail: str | None, exit_code: int | None) -> dict[str, Any]:
    event_data: dict[str, Any] = {"event": "state", "state": state}
    if reason is not None:
        event_data["reason"] = reason
    if detail is not None:
        event_data["detail"] = detail
    if exit_code is not None:
        event_data["exit_code"] = exit_code
    return event_data
