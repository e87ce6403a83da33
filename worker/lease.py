"""Keeping a job's lease alive while its trainer runs; losing it means someone else may own the job now."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from store import Database
from store.errors import JobDBError

log = logging.getLogger(__name__)


class LeaseKeeper(threading.Thread):
    """Renews ``owner``'s lease every ``interval_s``; sets ``lost`` when the DB says it is gone.

    ``expired()`` also holds, without asking the DB, once ``lease_seconds`` passed since the last renewal
    was asked for (the lease was taken at ``taken_at``, a ``time.monotonic()`` reading): a host that was
    frozen or cut off that long may have lost the job to another, so it fences itself at once on waking,
    before its trainer or its event relay write anything more.
    """

    def __init__(
        self,
        db: Database,
        job_id: str,
        owner: str,
        lease_seconds: float,
        interval_s: float,
        *,
        taken_at: float | None = None,
    ) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.db, self.job_id, self.owner = db, job_id, owner
        self.lease_seconds, self.interval_s = lease_seconds, interval_s
        self.lost = threading.Event()
        self._stopping = threading.Event()
        self._renewed_at = time.monotonic() if taken_at is None else taken_at

    def expired(self) -> bool:
        """Whether the lease is gone (the DB said so) or may be (not renewed for ``lease_seconds``)."""
        return self.lost.is_set() or time.monotonic() - self._renewed_at >= self.lease_seconds

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            asked_at = time.monotonic()
            try:
                if not self.db.renew_lease(self.job_id, self.owner, self.lease_seconds):
                    self.lost.set()
                    return
                self._renewed_at = asked_at
            except JobDBError as exc:  # a DB hiccup: try again next round; the lease outlives a few
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=10)


def default_owner(task_id: str | None = None) -> str:
    """A lease owner unique per delivery: ``host:pid:task``."""
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"
