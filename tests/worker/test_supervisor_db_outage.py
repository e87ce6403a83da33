"""A trainer's result outlives a job-database outage: the supervisor records it once the database is back,
as long as its lease may still hold (else the janitor would run a finished job again)."""

from __future__ import annotations

import pytest

from store.errors import DatabaseUnavailable
from worker.supervisor import Supervisor


class FakeKeeper:
    def __init__(self, expired: bool) -> None:
        self._expired = expired

    def expired(self) -> bool:
        return self._expired


def bare_supervisor(keeper: FakeKeeper | None) -> Supervisor:
    supervisor = Supervisor.__new__(Supervisor)  # only what _while_leased reads
    supervisor.job_id = "job_outage"
    supervisor.keeper = keeper  # type: ignore[assignment]  # a stand-in with expired()
    return supervisor


def test_the_result_is_recorded_once_the_database_answers_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.supervisor.time.sleep", lambda _s: None)
    calls: list[int] = []

    def finish() -> bool:
        calls.append(1)
        if len(calls) < 4:
            raise DatabaseUnavailable("job database error: database is not accepting connections")
        return True

    assert bare_supervisor(FakeKeeper(expired=False))._while_leased(finish) is True
    assert len(calls) == 4


def test_a_lapsed_lease_ends_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.supervisor.time.sleep", lambda _s: None)

    def finish() -> bool:
        raise DatabaseUnavailable("down")

    with pytest.raises(DatabaseUnavailable):
        bare_supervisor(FakeKeeper(expired=True))._while_leased(finish)
