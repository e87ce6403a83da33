"""The notification outbox: a flag set with every terminal state, claimed by the janitor."""

from __future__ import annotations

from sqlalchemy import select, update

from store.base import StoreBase, rowcount
from store.tables import (
    Job,
)


class NotificationsStore(StoreBase):
    """Claiming and returning pending notifications."""

    # ── notifications (worker/notify.py): an outbox flag set with every terminal state ──
    def claim_notifications(self, limit: int = 100) -> list[Job]:
        """Take jobs whose end was not yet handed to the notify queue; each is returned to one caller only."""
        with self._begin() as s:
            pending = list(s.scalars(select(Job.id).where(Job.notify_pending.is_(True)).order_by(Job.id).limit(limit)))
        claimed = []
        for job_id in pending:
            with self._begin() as s:
                won = rowcount(s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.notify_pending.is_(True))
                    .values(notify_pending=False)
                    .execution_options(synchronize_session=False)
                ))
                if won == 1:
                    claimed.append(s.get(Job, job_id, populate_existing=True))
        return [job for job in claimed if job is not None]

    def mark_notify_pending(self, job_id: str) -> None:
        """Put a claimed job's notifications back (the queue was unreachable): the next pass takes them."""
        with self._begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(notify_pending=True)
                .execution_options(synchronize_session=False)
            )
