"""Placement: fractions and memory per GPU, best fit, strict FIFO within a priority, the per-user cap,
foreign processes, the dispatch lock, and what a requeue or a failed send does to a dispatch."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from core.settings import Settings
from core.states import QUEUED
from store import Database, utcnow
from worker.dispatch import dispatch, recover_stale
from worker.gpus import GiB, fake_uuid
from worker.placement import (
    BEHIND_EARLIER_JOB,
    GPU_FULL,
    USER_FRACTION_CAP,
    GpuView,
    Ticket,
    gpu_views,
    never_fits,
    plan_dispatch,
)

CPU_QUEUE = "test.cpu"


def gpu(index: int, total_gib: int = 16, **kw: object) -> GpuView:
    kw = {"online": True, **kw}
    return GpuView(uuid=fake_uuid(index), host="h", index=index, name="fake", memory_total_bytes=total_gib * GiB, **kw)  # type: ignore[arg-type]


def ticket(job_id: str, fraction: float, request: str = "any", owner: int = 1, on: str | None = None) -> Ticket:
    return Ticket(job_id, owner, fraction, request, on)


def placed(plan: object) -> dict[str, str]:
    return {p.job_id: p.gpu for p in plan.placements}  # type: ignore[attr-defined]


# ── the rule, as a pure function ──
def test_two_halves_per_gpu_then_the_rest_wait() -> None:
    queued = [ticket(f"j{i}", 0.5) for i in range(6)]
    plan = plan_dispatch(queued, [], [gpu(0), gpu(1)], cpu_queue=CPU_QUEUE)
    on = placed(plan)
    assert len(on) == 4 and sorted(on.values()).count(fake_uuid(0)) == 2
    assert set(on) == {"j0", "j1", "j2", "j3"}  # FIFO: the first four
    assert "waiting" in plan.notes["j4"] and "j5" in plan.notes


def test_a_job_asking_0_6_waits_while_two_at_0_5_run() -> None:
    running = [ticket("a", 0.5, on=fake_uuid(0)), ticket("b", 0.5, on=fake_uuid(0))]
    plan = plan_dispatch([ticket("big", 0.6)], running, [gpu(0)], cpu_queue=CPU_QUEUE)
    assert plan.placements == [] and "0.00 of its memory fraction free" in plan.notes["big"]
    plan = plan_dispatch([ticket("big", 0.6)], running[:1], [gpu(0)], cpu_queue=CPU_QUEUE)
    assert plan.placements == [] and "0.50 of its memory fraction free" in plan.notes["big"]
    assert placed(plan_dispatch([ticket("big", 0.6)], [], [gpu(0)], cpu_queue=CPU_QUEUE)) == {"big": fake_uuid(0)}


def test_best_fit_fills_the_fuller_gpu_first() -> None:
    running = [ticket("a", 0.5, on=fake_uuid(1))]
    plan = plan_dispatch([ticket("small", 0.25)], running, [gpu(0), gpu(1)], cpu_queue=CPU_QUEUE)
    assert placed(plan) == {"small": fake_uuid(1)}


def test_strict_fifo_a_blocked_job_is_not_overtaken_on_its_gpus() -> None:
    running = [ticket("a", 0.5, on=fake_uuid(0))]
    queued = [ticket("big", 0.75), ticket("small", 0.25)]
    plan = plan_dispatch(queued, running, [gpu(0)], cpu_queue=CPU_QUEUE)
    assert plan.placements == [] and plan.reasons == {"big": GPU_FULL, "small": BEHIND_EARLIER_JOB}
    # ... but a later job may use a GPU the blocked one cannot: it asked for GPU 0 only
    queued = [ticket("big", 0.75, request=fake_uuid(0)), ticket("small", 0.25)]
    plan = plan_dispatch(queued, running, [gpu(0), gpu(1)], cpu_queue=CPU_QUEUE)
    assert placed(plan) == {"small": fake_uuid(1)}


def test_the_per_user_cap_holds_back_that_user_only() -> None:
    running = [ticket("a", 0.75, owner=1, on=fake_uuid(0))]
    queued = [ticket("mine", 0.5, owner=1), ticket("theirs", 0.5, owner=2)]
    plan = plan_dispatch(queued, running, [gpu(0), gpu(1)], cpu_queue=CPU_QUEUE, user_cap=1.0)
    assert placed(plan) == {"theirs": fake_uuid(1)}
    assert "max_gpu_fraction_per_user" in plan.notes["mine"]


def test_a_foreign_process_reduces_capacity() -> None:
    busy = gpu(0, foreign_bytes=10 * GiB)  # 16 GiB, 10 held by someone else: 6 left
    plan = plan_dispatch([ticket("half", 0.5)], [], [busy], cpu_queue=CPU_QUEUE)
    assert plan.placements == [] and "6.0 GiB free of 8.0 needed" in plan.notes["half"]
    assert placed(plan_dispatch([ticket("third", 0.3)], [], [busy], cpu_queue=CPU_QUEUE)) == {"third": fake_uuid(0)}


def test_the_context_allowance_and_reserve_count() -> None:
    # 0.5 + 0.5 fit by fraction, but each also needs 1 GiB of context: 2 × 9 GiB > 16 GiB
    plan = plan_dispatch([ticket("a", 0.5), ticket("b", 0.5)], [], [gpu(0)], cpu_queue=CPU_QUEUE, allowance=GiB)
    assert placed(plan) == {"a": fake_uuid(0)}
    plan = plan_dispatch([ticket("a", 0.5), ticket("b", 0.5)], [], [gpu(0)], cpu_queue=CPU_QUEUE, reserve=0.1)
    assert placed(plan) == {"a": fake_uuid(0)}
    # a whole GPU needs the whole GPU, allowance or not
    assert placed(plan_dispatch([ticket("all", 1.0)], [], [gpu(0)], cpu_queue=CPU_QUEUE, allowance=GiB))


def test_slots_offline_draining_and_quarantined_gpus_take_nothing() -> None:
    queued = [ticket("j", 0.1)]
    for view in (gpu(0, slots=1), gpu(0, online=False), gpu(0, draining=True), gpu(0, quarantined=True)):
        running = [ticket("r", 0.1, on=fake_uuid(0))]
        assert plan_dispatch(queued, running, [view], cpu_queue=CPU_QUEUE).placements == [], view.state
    assert "0:draining" in plan_dispatch(queued, [], [gpu(0, draining=True)], cpu_queue=CPU_QUEUE).notes["j"]


def test_cpu_jobs_and_any_jobs_without_gpus_go_to_the_cpu_queue() -> None:
    plan = plan_dispatch([ticket("c", 0.5, request="cpu"), ticket("a", 0.5)], [], [], cpu_queue=CPU_QUEUE)
    assert [(p.gpu, p.queue) for p in plan.placements] == [("cpu", CPU_QUEUE), ("cpu", CPU_QUEUE)]
    plan = plan_dispatch([ticket("c", 0.5, request="cpu")], [], [gpu(0)], cpu_queue=CPU_QUEUE)
    assert plan.placements[0].queue == CPU_QUEUE
    plan = plan_dispatch([ticket("g", 0.5)], [], [gpu(0)], cpu_queue=CPU_QUEUE)
    assert plan.placements[0].queue == f"gpu.{fake_uuid(0)}"


def test_never_fits_names_the_field(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, gpu_reserve_fraction=0.1, fake_gpus="1x16GiB")
    missing = never_fits({"resources": {"gpu": "GPU-11111111-1111-1111-1111-111111111111"}}, [gpu(0)], settings)
    assert [(p.code, p.field) for p in missing] == [("unknown_gpu", "resources.gpu")]
    assert never_fits({"resources": {"gpu": "GPU-11111111-1111-1111-1111-111111111111"}}, [], settings)
    too_big = never_fits({"resources": {"memory_fraction": 0.95}}, [gpu(0)], settings)
    assert [p.field for p in too_big] == ["resources.memory_fraction"] and "0.9" in too_big[0].detail
    assert never_fits({"resources": {"memory_fraction": 0.9}}, [gpu(0, online=False)], settings) == []
    assert never_fits({"resources": {"memory_fraction": 0.95}}, [], settings) == []  # no GPUs: a CPU job


# ── with the job DB ──
@pytest.fixture
def fake_settings(settings: Settings) -> Settings:
    """The test's settings on two fake 16 GiB GPUs (no context allowance)."""
    return settings.model_copy(update={"fake_gpus": "2x16GiB"})


@pytest.fixture
def gpu_db(db: Database) -> Database:
    for index in (0, 1):
        db.register_gpu(fake_uuid(index), host="h", index=index, name="fake", memory_total_bytes=16 * GiB)
    return db


def online(uuids: object) -> dict[str, dict[str, object]]:
    return {u: {"slots": 4, "time": 0.0} for u in uuids}  # type: ignore[attr-defined]


def half(name: str = "half") -> dict[str, object]:
    return {"name": name, "resources": {"gpu": "any", "memory_fraction": 0.5}}


def test_dispatch_marks_then_sends_and_keeps_fifo(
    fake_settings: Settings, gpu_db: Database, make_job: Callable[..., str]
) -> None:
    ids = [make_job(half(f"j{i}")) for i in range(5)]
    sent: list[tuple[str, str]] = []
    report = dispatch(gpu_db, fake_settings, gpu_views(gpu_db, online), lambda j, q: sent.append((j, q)))
    assert [j for j, _ in sent] == ids[:4] and {q for _, q in sent} == {f"gpu.{fake_uuid(0)}", f"gpu.{fake_uuid(1)}"}
    first = gpu_db.get_job(ids[0])
    assert first.gpu in (fake_uuid(0), fake_uuid(1)) and first.dispatched_at is not None
    waiting = gpu_db.get_job(ids[4])
    assert waiting.dispatched_at is None and waiting.queue_position == 1 and "waiting" in waiting.dispatch_note
    assert waiting.waiting_reason == USER_FRACTION_CAP and waiting.estimated_start_at is not None
    assert report.waiting == {ids[4]: waiting.dispatch_note}
    # a second pass sends nothing twice
    assert dispatch(gpu_db, fake_settings, gpu_views(gpu_db, online), lambda j, q: sent.append((j, q))).sent == []
    assert len(sent) == 4


def test_a_failed_send_takes_the_mark_back(
    fake_settings: Settings, gpu_db: Database, make_job: Callable[..., str]
) -> None:
    job_id = make_job(half())

    def down(job: str, queue: str) -> None:
        raise ConnectionError("broker down")

    report = dispatch(gpu_db, fake_settings, gpu_views(gpu_db, online), down)
    assert [p.job_id for p, _ in report.failed] == [job_id]
    job = gpu_db.get_job(job_id)
    assert (job.state, job.gpu, job.dispatched_at) == (QUEUED, None, None) and "unreachable" in job.dispatch_note


def test_a_dispatched_job_runs_only_on_its_gpu_and_a_requeue_clears_the_dispatch(
    fake_settings: Settings, gpu_db: Database, make_job: Callable[..., str]
) -> None:
    job_id = make_job(half())
    dispatch(gpu_db, fake_settings, gpu_views(gpu_db, online), lambda j, q: None)
    target = gpu_db.get_job(job_id).gpu
    other = fake_uuid(1) if target == fake_uuid(0) else fake_uuid(0)
    assert gpu_db.take_lease(job_id, "stray", 0.01, gpu=other) is None
    assert gpu_db.take_lease(job_id, "worker", 0.01, gpu=target) is not None
    report = gpu_db.requeue_expired(utcnow() + dt.timedelta(seconds=1))
    assert report.requeued == [job_id]
    job = gpu_db.get_job(job_id)
    assert (job.gpu, job.dispatched_at, job.queue_position) == (None, None, None)  # placed anew by the next pass


def test_a_stale_dispatch_to_an_offline_gpu_is_taken_back(
    fake_settings: Settings, gpu_db: Database, make_job: Callable[..., str]
) -> None:
    job_id = make_job(half())
    dispatch(gpu_db, fake_settings, gpu_views(gpu_db, online), lambda j, q: None)
    later = utcnow() + dt.timedelta(seconds=fake_settings.dispatch_stale_s + 1)
    assert recover_stale(gpu_db, gpu_views(gpu_db, online), fake_settings, now=later) == []  # GPU still online
    assert recover_stale(gpu_db, gpu_views(gpu_db, lambda uuids: {}), fake_settings, now=later) == [job_id]
    assert gpu_db.get_job(job_id).dispatched_at is None


def test_two_dispatchers_at_once_never_overcommit(
    fake_settings: Settings, gpu_db: Database, make_job: Callable[..., str]
) -> None:
    ids = [make_job(half(f"j{i}")) for i in range(12)]
    sent: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def one_dispatcher() -> None:
        database = Database(fake_settings.database_url)  # its own engine and connections, like another process
        try:
            start.wait()
            for _ in range(3):
                views = gpu_views(database, online)

                def send(job_id: str, queue: str) -> None:
                    with lock:
                        sent.append(job_id)

                dispatch(database, fake_settings, views, send)
        finally:
            database.dispose()

    threads = [threading.Thread(target=one_dispatcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(sent) == sorted(ids[:4]) and len(sent) == 4  # two per GPU, each sent once
    on_gpu = [gpu_db.get_job(j).gpu for j in ids[:4]]
    assert on_gpu.count(fake_uuid(0)) == 2 and on_gpu.count(fake_uuid(1)) == 2
