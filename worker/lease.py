"""Keeping a job's lease alive while its trainer runs; losing it means someone else may own the job now."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from worker.db import Database
from worker.errors import JobDBError

log = logging.getLogger(__name__)


class LeaseKeeper(threading.Thread):
    """Renews ``owner``'s lease every ``interval_s``; sets ``lost`` when the DB says it is gone."""

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float, interval_s: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.db, self.job_id, self.owner = db, job_id, owner
        self.lease_seconds, self.interval_s = lease_seconds, interval_s
        self.lost = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                if not self.db.renew_lease(self.job_id, self.owner, self.lease_seconds):
                    self.lost.set()
                    return
            except JobDBError as exc:  # a DB hiccup: try again next round; the lease outlives a few
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=10)


def default_owner(task_id: str | None = None) -> str:
    """A lease owner unique per delivery: ``host:pid:task``."""
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"
