"""Preemption: the pure plan (a table of cases), the dispatcher applying it, the supervisor stopping and
requeueing a victim without counting its attempt, and the resume from its checkpoint."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from celery_helpers import events_of, highway_spec

from core.settings import Settings
from core.states import QUEUED, RUNNING, SUCCEEDED
from store import Database, utcnow
from worker.dispatch import dispatch
from worker.gpus import GiB, fake_uuid
from worker.placement import PREEMPTING, gpu_views
from worker.preemption import Claimant, Holder, PreemptPolicy, plan_preemption
from worker.storage import LocalStorage
from worker.supervisor import supervise

NOW = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC)
LONG_AGO = NOW - dt.timedelta(hours=1)
POLICY = PreemptPolicy(enabled=True, after_s=300, min_run_s=120)
FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]


def holder(job_id: str, fraction: float = 0.5, **kw: object) -> tuple[Holder, float]:
    fields = {"gpu": "g0", "priority": 0, "started_at": LONG_AGO, **kw}
    return Holder(job_id, **fields), fraction  # type: ignore[arg-type]


def plan(claim: Claimant, holding: list[tuple[Holder, float]], policy: PreemptPolicy = POLICY) -> object:
    """plan_preemption on one GPU of capacity 1.0 where the claimant needs ``fraction`` in ``claim.id``."""
    fractions = {h.id: f for h, f in holding}
    need = float(claim.id.split(":")[1])

    def fits(c: Claimant, gpu: str, without: frozenset[str]) -> bool:
        used = sum(f for h, f in holding if h.gpu == gpu and h.id not in without)
        return used + need <= 1.0 + 1e-9

    assert fractions is not None
    return plan_preemption([claim], [h for h, _ in holding], fits=fits, now=NOW, policy=policy)


def claimant(need: float = 0.5, priority: int = 1, waited_s: float = 600, **kw: object) -> Claimant:
    return Claimant(f"hi:{need}", priority, NOW - dt.timedelta(seconds=waited_s), ("g0",), **kw)  # type: ignore[arg-type]


def victims(result: object) -> tuple[str, ...] | None:
    return None if result is None else result.victims  # type: ignore[attr-defined]


CASES = [
    # (name, claimant, holders, policy, expected victims)
    (
        "one half frees a half",
        claimant(),
        [holder("a"), holder("b", started_at=LONG_AGO + dt.timedelta(minutes=1))],
        POLICY,
        ("b",),
    ),
    (
        "most recently started goes first",
        claimant(),
        [holder("a", started_at=NOW - dt.timedelta(seconds=500)), holder("b")],
        POLICY,
        ("a",),
    ),
    ("least work lost first", claimant(), [holder("a", work_lost=10), holder("b", work_lost=2)], POLICY, ("b",)),
    ("lowest priority first", claimant(priority=5), [holder("a", priority=1), holder("b", priority=0)], POLICY, ("b",)),
    ("over quota first", claimant(), [holder("a"), holder("b", over_quota=True, work_lost=99)], POLICY, ("b",)),
    ("a whole GPU needs both", claimant(1.0), [holder("a"), holder("b")], POLICY, ("a", "b")),
    (
        "least work lost, even as two",
        claimant(0.5),
        [holder("a", 0.25, work_lost=0), holder("b", 0.25, work_lost=1), holder("c", 0.5, work_lost=2)],
        POLICY,
        ("a", "b"),
    ),
    (
        "never more than needed",
        claimant(0.5),
        [holder("a", 0.25, work_lost=0), holder("b", 0.5, work_lost=1), holder("c", 0.25, work_lost=5)],
        POLICY,
        ("b",),
    ),
    ("equal priority never preempts", claimant(priority=0), [holder("a"), holder("b")], POLICY, None),
    ("waited less than preempt_after_s", claimant(waited_s=10), [holder("a"), holder("b")], POLICY, None),
    (
        "ran less than preempt_min_run_s",
        claimant(),
        [holder("a", started_at=NOW - dt.timedelta(seconds=60)), holder("b", started_at=NOW)],
        POLICY,
        None,
    ),
    (
        "preempted within preempt_min_run_s",
        claimant(),
        [holder("a", preempted_at=NOW - dt.timedelta(seconds=60)), holder("b", preempted_at=NOW)],
        POLICY,
        None,
    ),
    ("not preemptible", claimant(), [holder("a", preemptible=False), holder("b", preemptible=False)], POLICY, None),
    ("frees too little", claimant(1.0), [holder("a"), holder("b", preemptible=False)], POLICY, None),
    ("a stop under way", claimant(), [holder("a", stopping=True), holder("b")], POLICY, None),
    ("dispatched, not started", claimant(), [holder("a", started_at=None), holder("b", started_at=None)], POLICY, None),
    ("the claimant is over quota", claimant(over_quota=True), [holder("a"), holder("b")], POLICY, None),
    ("switched off", claimant(), [holder("a"), holder("b")], PreemptPolicy(enabled=False), None),
    (
        "guards at 0",
        claimant(waited_s=0),
        [holder("a", started_at=NOW - dt.timedelta(seconds=1)), holder("b", started_at=NOW)],
        PreemptPolicy(after_s=0, min_run_s=0),
        ("b",),
    ),
]


@pytest.mark.parametrize(("name", "claim", "holding", "policy", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plan_preemption(
    name: str, claim: Claimant, holding: list[tuple[Holder, float]], policy: PreemptPolicy, expected: object
) -> None:
    result = plan(claim, holding, policy)
    got = victims(result)
    assert (tuple(sorted(got)) if got else None) == (tuple(sorted(expected)) if expected else None), name  # type: ignore[arg-type]


# ── the dispatcher applies it ────────────────────────────────────────────────────────────────────────
@pytest.fixture
def one_gpu(settings: Settings, db: Database) -> tuple[Settings, Database]:
    db.register_gpu(fake_uuid(0), host="h", index=0, name="fake", memory_total_bytes=16 * GiB)
    quick = {"fake_gpus": "1x16GiB", "preempt_after_s": 0.0, "preempt_min_run_s": 0.0, "max_gpu_fraction_per_user": 1.0}
    return settings.model_copy(update=quick), db


def online(uuids: object) -> dict[str, dict[str, object]]:
    return {u: {"slots": 4, "time": 0.0} for u in uuids}  # type: ignore[attr-defined]


def users_and_dataset(db: Database, storage: LocalStorage, digits_h5: Path) -> tuple[int, int, str]:
    low, _ = db.create_user("low")
    high, _ = db.create_user("high")
    with digits_h5.open("rb") as fh:
        stored = storage.put_dataset_stream(fh, max_bytes=10 * 2**20)
    dataset, _ = db.add_dataset(low.id, stored.sha256, stored.size_bytes, {}, stored.key, name="digits")
    return low.id, high.id, dataset.id


def gpu_job(epochs: int = 3, epoch_s: float = 0.3, **resources: object) -> dict[str, object]:
    return {
        "name": "fake",
        "fake": {"epochs": epochs, "epoch_s": epoch_s},
        "resources": {"gpu": "any", "memory_fraction": 0.5, **resources},
    }


def fill_and_claim(
    settings: Settings, db: Database, storage: LocalStorage, digits_h5: Path, **resources: object
) -> tuple[list[str], str]:
    """Two running priority-0 halves on the one GPU, then a priority-1 half waiting."""
    low, high, dataset = users_and_dataset(db, storage, digits_h5)
    lows = [db.create_job(low, dataset, gpu_job(**resources), max_active=9, max_attempts=3).id for _ in range(2)]
    dispatch(db, settings, gpu_views(db, online), lambda j, q: None)
    for job_id in lows:
        assert db.take_lease(job_id, f"w-{job_id}", 60, gpu=fake_uuid(0)) is not None
    hi = db.create_job(high, dataset, gpu_job(), max_active=9, max_attempts=3, priority=1).id
    return lows, hi


def test_the_dispatcher_asks_one_victim_to_stop_and_says_so(
    one_gpu: tuple[Settings, Database], storage: LocalStorage, digits_h5: Path
) -> None:
    settings, db = one_gpu
    lows, hi = fill_and_claim(settings, db, storage, digits_h5)
    dispatch(db, settings, gpu_views(db, online), lambda j, q: None)
    marked = [j for j in lows if db.get_job(j).preempted_by == hi]
    assert len(marked) == 1  # never more than needed
    victim = db.get_job(marked[0])
    assert victim.state == RUNNING and victim.waiting_reason == f"preempted_by {hi}"
    assert db.stop_request(victim.id) == (False, hi)
    claimant = db.get_job(hi)
    assert claimant.waiting_reason == f"{PREEMPTING} {victim.id}" and claimant.state == QUEUED
    assert [e["by"] for e in events_of(db, victim.id, "preempting")] == [hi]
    # a second pass while the victim stops asks nobody else
    dispatch(db, settings, gpu_views(db, online), lambda j, q: None)
    assert [j for j in lows if db.get_job(j).preempted_by] == marked
    assert db.get_job(hi).waiting_reason == f"{PREEMPTING} {victim.id}"


@pytest.mark.parametrize(
    ("update", "resources"),
    [
        ({"preemption": False}, {}),
        ({"preempt_after_s": 3600.0}, {}),
        ({"preempt_min_run_s": 3600.0}, {}),
        ({}, {"preemptible": False}),
    ],
    ids=["switched off", "claimant waited too little", "victims ran too little", "victims pinned"],
)
def test_the_guards_hold(
    one_gpu: tuple[Settings, Database],
    storage: LocalStorage,
    digits_h5: Path,
    update: dict[str, object],
    resources: dict[str, object],
) -> None:
    settings, db = one_gpu
    lows, hi = fill_and_claim(settings.model_copy(update=update), db, storage, digits_h5, **resources)
    dispatch(db, settings.model_copy(update=update), gpu_views(db, online), lambda j, q: None)
    assert [db.get_job(j).preempted_by for j in lows] == [None, None]
    assert db.get_job(hi).waiting_reason == "gpu_full"


# ── the supervisor stops the victim; it resumes ──────────────────────────────────────────────────────
def test_a_preempted_job_requeues_without_losing_an_attempt_and_resumes(
    one_gpu: tuple[Settings, Database], storage: LocalStorage, digits_h5: Path
) -> None:
    settings, db = one_gpu
    settings = settings.model_copy(update={"fake_gpus": None, "redis_url": "", "cancel_poll_s": 0.1})
    low, _high, dataset = users_and_dataset(db, storage, digits_h5)
    spec = {"name": "fake", "fake": {"epochs": 6, "epoch_s": 0.4}, "resources": {"gpu": "cpu"}}
    victim = db.create_job(low, dataset, spec, max_active=9, max_attempts=1).id

    def preempt_after_two_epochs(job_id: str) -> None:
        import threading
        import time

        def watch() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(events_of(db, job_id, "checkpoint")) < 2:
                time.sleep(0.05)
            with db.dispatch_lock("test") as txn:
                assert txn.request_preemption(job_id, "job_hi", utcnow())

        threading.Thread(target=watch, daemon=True).start()

    preempt_after_two_epochs(victim)
    first = supervise(victim, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert (first.state, first.reason) == (QUEUED, "preempted")
    job = db.get_job(victim)
    assert (job.state, job.attempts, job.preemptions, job.preempted_by) == (QUEUED, 0, 1, "job_hi")
    assert [e["by"] for e in events_of(db, victim, "preempted")] == ["job_hi"]
    # max_attempts is 1: a counted attempt would leave it none; the preempted one left it its only attempt
    again = supervise(victim, settings, db=db, storage=storage, trainer_argv=FAKE_TRAINER)
    assert again.state == SUCCEEDED and again.resumed
    job = db.get_job(victim)
    assert (job.attempts, job.preemptions, job.preempted_by) == (1, 1, None)
    started = events_of(db, victim, "started")
    assert started[1]["resumed_from_epoch"] >= 2
    trained = [e["epoch"] for e in events_of(db, victim, "epoch_end")]
    assert sorted(trained) == list(range(1, 7)) and len(trained) == 6  # no epoch trained twice
    attempts = db.usage(NOW - dt.timedelta(days=3650), utcnow() + dt.timedelta(seconds=1), "user")
    assert attempts == []  # CPU attempts are no GPU usage


@pytest.mark.slow
def test_the_real_trainer_preempted_mid_epoch_resumes_from_its_checkpoint(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:

    settings = settings.model_copy(update={"redis_url": "", "cancel_poll_s": 0.1})
    job_id = make_job(highway_spec(epochs=4, batch_size=16), max_attempts=1)

    def preempt_in_the_second_epoch() -> None:
        import threading
        import time

        def watch() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not events_of(db, job_id, "epoch_end"):
                time.sleep(0.05)
            with db.dispatch_lock("test") as txn:
                assert txn.request_preemption(job_id, "job_hi", utcnow())

        threading.Thread(target=watch, daemon=True).start()

    preempt_in_the_second_epoch()
    first = supervise(job_id, settings, db=db, storage=storage)
    assert (first.state, first.reason) == (QUEUED, "preempted"), first
    job = db.get_job(job_id)
    assert (job.attempts, job.preemptions) == (0, 1)
    stopped_at = [e for e in events_of(db, job_id, "checkpoint")][-1]
    again = supervise(job_id, settings, db=db, storage=storage)
    assert again.state == SUCCEEDED and again.resumed, again
    resumed = events_of(db, job_id, "started")[-1]["resumed_from_epoch"]
    assert resumed == stopped_at["epoch"] >= 1  # from the checkpoint the stop wrote, not from scratch
    ends = [e["epoch"] for e in events_of(db, job_id, "epoch_end")]
    assert set(ends) == {1, 2, 3, 4} and db.get_job(job_id).attempts == 1
    print(f"stopped with checkpoint {stopped_at}; epochs ended: {ends}")
