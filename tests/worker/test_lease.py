"""worker/lease.py: the lease keeper renews, notices a lost lease, and fences itself after a long freeze."""

from __future__ import annotations

import time
from typing import Any

from support import wait_for

from worker.lease import LeaseKeeper


class FakeLeaseDB:
    """``renew_lease`` answers ``held``; counts the renewals."""

    def __init__(self, held: bool = True) -> None:
        self.held, self.renewals = held, 0

    def renew_lease(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        self.renewals += 1
        return self.held


def keeper(db: Any, lease_seconds: float, interval_s: float, **kwargs: Any) -> LeaseKeeper:
    return LeaseKeeper(db, "job_x", "host:1:t", lease_seconds, interval_s, **kwargs)


def test_renewals_keep_the_lease() -> None:
    db = FakeLeaseDB()
    k = keeper(db, lease_seconds=0.6, interval_s=0.05)
    k.start()
    try:
        wait_for(lambda: db.renewals >= 20, 10, "renewals over more than a lease")
        assert not k.expired()
    finally:
        k.stop()


def test_the_db_saying_no_loses_the_lease() -> None:
    k = keeper(FakeLeaseDB(held=False), lease_seconds=60, interval_s=0.01)
    k.start()
    k.lost.wait(5)
    assert k.lost.is_set() and k.expired()


def test_not_renewed_for_a_whole_lease_expires_without_asking_the_db() -> None:
    # A frozen host wakes with an old last renewal: it must not trust its lease, whatever the DB will say.
    db = FakeLeaseDB()
    k = keeper(db, lease_seconds=10, interval_s=60, taken_at=time.monotonic() - 10.5)
    assert k.expired() and not k.lost.is_set() and db.renewals == 0
    assert not keeper(db, lease_seconds=10, interval_s=60).expired()
