"""The job DB: schema, leases, the janitor, cancels, events, caps; on SQLite and on PostgreSQL.

PostgreSQL runs at GPUYARD_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test),
each test in a fresh schema ``gpuyard_test_<random>`` that is dropped afterwards; those tests are
skipped, saying why, when the server cannot be reached.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

import store as jobdb
from core.states import CANCELLED, INTERRUPTED, QUEUED, RUNNING, SUCCEEDED
from store import Database
from store.errors import ActiveJobLimit, DatasetInUse, UnknownDataset, UserExists

POSTGRES_URL = os.environ.get("GPUYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SHA = "ab" * 32


def _postgres_schema() -> Iterator[str]:
    """Create a fresh schema for one test, yield its name, drop it (and only it) afterwards."""
    schema = f"gpuyard_test_{secrets.token_hex(6)}"
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} (set GPUYARD_TEST_POSTGRES_URL): {exc.orig}")
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A callable opening another Database on the same store (like a second process would)."""
    opened: list[Database] = []
    if request.param == "sqlite":
        url, schema_gen = f"sqlite:///{tmp_path / 'jobs.db'}", None
        schema = None
    else:
        schema_gen = _postgres_schema()
        schema = next(schema_gen)
        url = POSTGRES_URL

    def factory() -> Database:
        database = Database(url, schema=schema)
        opened.append(database)
        return database

    yield factory
    for database in opened:
        database.dispose()
    if schema_gen is not None:
        with pytest.raises(StopIteration):
            next(schema_gen)


@pytest.fixture
def db(db_factory) -> Database:  # type: ignore[no-untyped-def]
    database = db_factory()
    database.migrate()
    return database


@pytest.fixture
def owner(db: Database) -> int:
    user, _ = db.create_user("alice")
    return user.id


@pytest.fixture
def dataset_id(db: Database, owner: int) -> str:
    dataset, _ = db.add_dataset(owner, SHA, 123, {"rows": {"train": 1}}, f"datasets/ab/{SHA}.h5")
    return dataset.id


def _job(db: Database, owner: int, dataset_id: str, *, max_attempts: int = 3) -> str:
    return db.create_job(owner, dataset_id, {"architecture": {}}, max_active=100, max_attempts=max_attempts).id


def _later(seconds: float) -> dt.datetime:
    return jobdb.utcnow() + dt.timedelta(seconds=seconds)


# ── schema: tests/store/test_migrations.py ──
def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    database.dispose()


# ── users ──
def test_tokens_are_stored_hashed(db: Database) -> None:
    user, token = db.create_user("bob", is_admin=True)
    assert user.token_hash != token and user.token_hash == jobdb.hash_token(token)
    assert db.user_for_token(token).name == "bob"
    assert db.user_for_token(token + "x") is None
    with pytest.raises(UserExists):
        db.create_user("bob")
    with pytest.raises(ValueError, match="Received: 'no spaces'"):
        db.create_user("no spaces")


# ── data sets ──
def test_same_content_same_owner_is_one_dataset(db: Database, owner: int, dataset_id: str) -> None:
    again, created = db.add_dataset(owner, SHA, 123, {}, "elsewhere")
    assert (again.id, created) == (dataset_id, False)
    other, _ = db.create_user("bob")
    theirs, created = db.add_dataset(other.id, SHA, 123, {}, f"datasets/ab/{SHA}.h5")
    assert created and theirs.id != dataset_id


def test_dataset_in_use_cannot_be_deleted(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    with pytest.raises(DatasetInUse):
        db.delete_dataset(dataset_id, owner)
    assert db.take_lease(job_id, "w1", 30)
    assert db.finish_job(job_id, "w1", SUCCEEDED)
    assert db.delete_dataset(dataset_id, owner).id == dataset_id
    assert db.get_job(job_id).dataset_id is None  # the finished job outlives its data set
    assert db.delete_dataset(dataset_id, owner) is None


# ── jobs and the cap ──
def test_active_job_cap(db: Database, owner: int, dataset_id: str) -> None:
    for _ in range(2):
        db.create_job(owner, dataset_id, {}, max_active=2, max_attempts=3)
    with pytest.raises(ActiveJobLimit, match="limit is 2"):
        db.create_job(owner, dataset_id, {}, max_active=2, max_attempts=3)
    with pytest.raises(UnknownDataset):
        db.create_job(owner, "ds_missing", {}, max_active=10, max_attempts=3)


def test_list_jobs_pages_with_a_cursor(db: Database, owner: int, dataset_id: str) -> None:
    start = jobdb.utcnow()
    ids = [
        db.create_job(owner, dataset_id, {}, max_active=99, max_attempts=1, now=start + dt.timedelta(seconds=i)).id
        for i in range(5)
    ]
    seen, cursor = [], None
    while True:
        page = db.list_jobs(owner, limit=2, cursor=cursor)
        seen += [j.id for j in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert db.list_jobs(owner, state=RUNNING).jobs == []
    with pytest.raises(ValueError, match="cursor"):
        db.list_jobs(owner, cursor="garbage!")


# ── leases ──
def test_take_lease_once(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    job = db.take_lease(job_id, "w1", 30, gpu="GPU-1")
    assert (job.state, job.attempts, job.lease_owner, job.gpu) == (RUNNING, 1, "w1", "GPU-1")
    assert job.started_at is not None and job.lease_expires_at > job.started_at
    assert db.take_lease(job_id, "w2", 30) is None  # a second delivery sees the live lease
    assert db.renew_lease(job_id, "w1", 30)
    assert not db.renew_lease(job_id, "w2", 30)


def test_expired_lease_can_be_taken_over(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    db.take_lease(job_id, "w1", 30)
    taken = db.take_lease(job_id, "w2", 30, now=_later(31))
    assert (taken.lease_owner, taken.attempts) == ("w2", 2)
    assert not db.renew_lease(job_id, "w1", 30)
    assert not db.finish_job(job_id, "w1", SUCCEEDED)  # the lost owner records nothing


def test_janitor_requeues_then_interrupts(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id, max_attempts=2)
    db.take_lease(job_id, "w1", 30)
    assert db.requeue_expired(_later(10)) == jobdb.JanitorReport()  # lease still live
    report = db.requeue_expired(_later(31))
    assert report.requeued == [job_id]
    job = db.get_job(job_id)
    assert (job.state, job.attempts, job.lease_owner) == (QUEUED, 1, None)
    assert db.take_lease(job_id, "w2", 30, now=_later(32)).attempts == 2
    report = db.requeue_expired(_later(100))
    assert report.interrupted == [job_id]
    job = db.get_job(job_id)
    assert (job.state, job.error_reason) == (INTERRUPTED, "worker_lost")
    assert job.finished_at is not None
    assert db.take_lease(job_id, "w3", 30, now=_later(200)) is None


def test_janitor_cancels_an_expired_job_with_a_cancel_request(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    db.take_lease(job_id, "w1", 30)
    assert db.request_cancel(job_id).cancel_requested
    assert db.requeue_expired(_later(31)).cancelled == [job_id]
    assert db.get_job(job_id).state == CANCELLED


def test_requeue_job_hands_a_job_back(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id, max_attempts=1)
    db.take_lease(job_id, "w1", 30)
    assert db.requeue_job(job_id, "w2", "worker_shutdown") is None
    assert db.requeue_job(job_id, "w1", "worker_shutdown") == INTERRUPTED  # its one attempt is spent


def test_finish_job(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    db.take_lease(job_id, "w1", 30)
    with pytest.raises(ValueError, match="terminal"):
        db.finish_job(job_id, "w1", RUNNING)
    assert db.finish_job(job_id, "w1", "failed", "out_of_memory", "too big", 5, peak_gpu_memory_bytes=7)
    job = db.get_job(job_id)
    assert (job.state, job.error_reason, job.exit_code, job.peak_gpu_memory_bytes) == (
        "failed",
        "out_of_memory",
        5,
        7,
    )
    assert job.lease_owner is None and job.finished_at is not None
    assert db.events_since(job_id)[-1].event["state"] == "failed"


def test_cancel(db: Database, owner: int, dataset_id: str) -> None:
    queued = _job(db, owner, dataset_id)
    job = db.request_cancel(queued)
    assert (job.state, job.cancel_requested) == (CANCELLED, True)
    assert db.take_lease(queued, "w1", 30) is None
    running = _job(db, owner, dataset_id)
    db.take_lease(running, "w1", 30)
    job = db.request_cancel(running)
    assert (job.state, job.cancel_requested) == (RUNNING, True)
    assert db.is_cancel_requested(running)
    assert db.request_cancel("job_missing") is None


def test_progress_and_events(db: Database, owner: int, dataset_id: str) -> None:
    job_id = _job(db, owner, dataset_id)
    assert not db.record_progress(job_id, {"epoch": 1})  # not running yet
    db.take_lease(job_id, "w1", 30)
    assert db.record_progress(job_id, {"epoch": 1, "loss": 0.5}, owner="w1")
    assert not db.record_progress(job_id, {"epoch": 2}, owner="w2")
    assert db.get_job(job_id).last_progress == {"epoch": 1, "loss": 0.5}
    seqs = [db.append_event(job_id, {"event": "epoch_end", "epoch": i}) for i in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    events = db.events_since(job_id, seqs[0])
    assert [e.seq for e in events] == seqs[1:]
    assert all("time" in e.event for e in events)


# ── races ──
def test_two_workers_racing_for_the_same_jobs_one_wins_each(db_factory, db: Database) -> None:  # type: ignore[no-untyped-def]
    owner, _ = db.create_user("racer")
    dataset, _ = db.add_dataset(owner.id, SHA, 1, {}, "k")
    job_ids = [_job(db, owner.id, dataset.id) for _ in range(8)]
    workers = [db_factory(), db_factory()]  # separate engines, as two processes would have
    wins: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    errors: list[BaseException] = []

    def work(name: str, database: Database, barrier: threading.Barrier) -> None:
        for job_id in job_ids:
            try:
                barrier.wait(timeout=30)
                if database.take_lease(job_id, name, 60) is not None:
                    wins[job_id].append(name)
            except BaseException as exc:  # reported below, with the thread's name
                errors.append(exc)

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=work, args=(f"w{i}", d, barrier)) for i, d in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(len(winners) == 1 for winners in wins.values()), wins
    assert all(db.get_job(job_id).attempts == 1 for job_id in job_ids)


def test_concurrent_submissions_respect_the_cap(db_factory, db: Database) -> None:  # type: ignore[no-untyped-def]
    owner, _ = db.create_user("eager")
    dataset, _ = db.add_dataset(owner.id, SHA, 1, {}, "k")
    databases = [db_factory() for _ in range(4)]
    barrier = threading.Barrier(len(databases))
    outcomes: list[str] = []

    def submit(database: Database) -> None:
        barrier.wait(timeout=30)
        try:
            database.create_job(owner.id, dataset.id, {}, max_active=2, max_attempts=1)
            outcomes.append("ok")
        except ActiveJobLimit:
            outcomes.append("limit")

    threads = [threading.Thread(target=submit, args=(d,)) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["limit", "limit", "ok", "ok"]


def test_postgres_ends_a_session_frozen_inside_a_transaction(db: Database) -> None:
    # A paused host frozen mid-transaction must not hold the job's row lock until it wakes: the janitor's
    # requeue of that job would wait behind it (seen in tests/deploy/test_compose_stack.py).
    if db.engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL session setting")
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "10s"
