"""Model operations (evaluate, predict, export) on a succeeded job."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update

from core.states import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
)
from store.base import StoreBase, rowcount
from store.tables import (
    Operation,
    new_id,
    utcnow,
)


class OperationsStore(StoreBase):
    """Operations rows: created queued, started once, finished once."""

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
            started = rowcount(s.execute(
                update(Operation)
                .where(Operation.id == operation_id, Operation.state == QUEUED)
                .values(state=RUNNING, started_at=now or utcnow())
            ))
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
                rowcount(s.execute(
                    update(Operation)
                    .where(Operation.id == operation_id, Operation.state == RUNNING)
                    .values(
                        state=state,
                        result=result,
                        error_reason=reason,
                        error_detail=detail,
                        finished_at=now or utcnow(),
                    )
                ))
            )
