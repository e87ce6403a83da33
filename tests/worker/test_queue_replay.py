"""A synthetic lab day replayed through the real dispatcher (job DB, fair order, placement, forecast) with
simulated time: no GPU over-committed, equal shares while everyone waits, bounded waits, and start
estimates that come true. Prints the figures (``pytest -s``)."""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.settings import Settings
from core.states import QUEUED
from store import Database
from store import jobs as job_store
from worker.dispatch import dispatch
from worker.gpus import GiB, fake_uuid
from worker.placement import GpuView, gpu_views

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
GPUS = 2
SLOTS = 4
USERS = ("ada", "bob", "cyd", "dee")
SWEEP_WINDOW_S = 1800.0  # the morning rush: every sweep is queued within half an hour


@dataclass(order=True)
class Submission:
    at: float
    user: str = field(compare=False)
    kind: int = field(compare=False)
    fraction: float = field(compare=False)
    priority: int = field(compare=False)
    seconds: float = field(compare=False)


def lab_day(seed: int = 7) -> list[Submission]:
    """200 jobs: ada queues a sweep of 80 at once, the others 40 each in sweeps of 10 within half an hour.
    Every user has the same three kinds of job (a data set + architecture + epochs): fractions 1/8, 1/4 and
    1/2, typical lengths 4–20 minutes, each run ±20 % of its kind's; four jobs each at priority 1."""
    rng = random.Random(seed)
    shapes = [(0.125, rng.uniform(240, 1200)), (0.25, rng.uniform(240, 1200)), (0.5, rng.uniform(240, 1200))]
    jobs = []
    for user in USERS:
        count = 80 if user == "ada" else 40
        sweeps = [0.0] if user == "ada" else [rng.uniform(0, SWEEP_WINDOW_S) for _ in range(count // 10)]
        for i in range(count):
            at = sweeps[i * len(sweeps) // count]
            kind = rng.randrange(3)
            fraction, typical = shapes[kind]
            priority = int(i % 10 == 5 and i < 40)
            jobs.append(Submission(at, user, kind, fraction, priority, typical * rng.uniform(0.8, 1.2)))
    return sorted(jobs)


class Lab:
    """The job DB and fake GPUs of the replay; workers start a dispatched job at once."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings(
            data_dir=tmp_path / "data", database_url=f"sqlite:///{(tmp_path / 'replay.db').as_posix()}", redis_url=""
        )
        self.db = Database(self.settings.database_url)
        self.db.migrate()
        for index in range(GPUS):
            self.db.register_gpu(fake_uuid(index), host="h", index=index, name="fake", memory_total_bytes=16 * GiB)
        self.users = {}
        self.datasets = {}
        for name in USERS:
            user, _ = self.db.create_user(name)
            self.db.set_max_priority(name, 1)
            self.users[name] = user.id
            for kind in range(3):
                dataset, _ = self.db.add_dataset(user.id, f"{name}{kind}".ljust(64, "0"), 1, {}, f"k/{name}{kind}")
                self.datasets[name, kind] = dataset.id

    def gpus(self) -> list[GpuView]:
        return gpu_views(self.db, lambda uuids: {u: {"slots": SLOTS, "time": 0.0} for u in uuids})


class LabDayReplay:
    """The lab day's simulation: the replay's clock, the jobs' records and what the run measured."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.pending = list(lab_day())
        self.ends: list[tuple[float, str]] = []  # (time, job id)
        self.info: dict[str, dict] = {}
        self.on_gpu: dict[str, dict[str, float]] = defaultdict(dict)  # uuid → job → fraction
        self.peak_fraction = 0.0
        self.fraction_seconds = 0.0
        self.got: dict[str, float] = defaultdict(float)
        self.busy_time = 0.0
        self.settled = False
        self.clock = 0.0

    def run(self) -> None:
        """Every submission and every job's end, in time order, each followed by a dispatch pass."""
        while self.pending or self.ends:
            next_submit = self.pending[0].at if self.pending else float("inf")
            next_end = self.ends[0][0] if self.ends else float("inf")
            now = min(next_submit, next_end)
            self._account(now)
            self.clock = now
            arrived = self._submit_due(now)
            self._end_due(now)
            self._report_etas(now)
            self._dispatch_pass(now)
            self._check_gpus()
            if not self.pending and not self.settled:  # every job is in: the estimates from here on can come true
                self._settle(now)
            self._record_estimates(arrived, now)

    def _account(self, now: float) -> None:
        used = sum(sum(jobs.values()) for jobs in self.on_gpu.values())
        self.fraction_seconds += used * (now - self.clock)
        if {i["user"] for i in self.info.values() if "start" not in i} == set(USERS):
            self.busy_time += now - self.clock  # the GPU-seconds each user held while every user had jobs waiting
            for jobs in self.on_gpu.values():
                for job_id, fraction in jobs.items():
                    self.got[self.info[job_id]["user"]] += fraction * (now - self.clock)

    def _submit_due(self, now: float) -> list[str]:
        arrived = []
        while self.pending and self.pending[0].at == now:
            sub = self.pending.pop(0)
            job_id = _submit(self.lab, sub, T0 + dt.timedelta(seconds=now))
            self.info[job_id] = {"user": sub.user, "submit": now, "fraction": sub.fraction, "seconds": sub.seconds}
            arrived.append(job_id)
        return arrived

    def _end_due(self, now: float) -> None:
        while self.ends and self.ends[0][0] == now:
            _, job_id = heapq.heappop(self.ends)
            job = self.lab.db.get_job(job_id)
            assert self.lab.db.finish_job(job_id, "w", "succeeded", now=T0 + dt.timedelta(seconds=now))
            del self.on_gpu[job.gpu][job_id]

    def _report_etas(self, now: float) -> None:
        for jobs in self.on_gpu.values():  # the trainers' ETAs, as their epoch_end events report them
            for job_id in jobs:
                left = self.info[job_id]["start"] + self.info[job_id]["seconds"] - now
                self.lab.db.record_progress(job_id, {"stage": "training", "eta_s": left})

    def _dispatch_pass(self, now: float) -> None:
        lab, info = self.lab, self.info
        sent: list[tuple[str, str]] = []
        dispatch(lab.db, lab.settings, lab.gpus(), lambda j, q: sent.append((j, q)), now=T0 + dt.timedelta(seconds=now))
        for job_id, _queue in sent:
            job = lab.db.get_job(job_id)
            assert lab.db.take_lease(job_id, "w", 10**6, gpu=job.gpu, now=T0 + dt.timedelta(seconds=now))
            info[job_id]["start"] = now
            info[job_id]["gpu"] = job.gpu
            self.on_gpu[job.gpu][job_id] = info[job_id]["fraction"]
            heapq.heappush(self.ends, (now + info[job_id]["seconds"], job_id))

    def _check_gpus(self) -> None:
        for uuid, jobs in self.on_gpu.items():
            assert sum(jobs.values()) <= 1.0 + 1e-9 and len(jobs) <= SLOTS, f"GPU {uuid} over-committed: {jobs}"
            self.peak_fraction = max(self.peak_fraction, sum(jobs.values()))

    def _settle(self, now: float) -> None:
        self.settled = True
        for job_id, i in self.info.items():
            if "start" not in i:
                i["settled"] = self.lab.db.get_job(job_id).estimated_start_at
                i["settled_at"] = now

    def _record_estimates(self, arrived: list[str], now: float) -> None:
        info = self.info
        for job_id in arrived:  # the estimate a user sees right after submitting
            job = self.lab.db.get_job(job_id)
            info[job_id]["ahead"] = sum(  # GPU work queued or running when it arrived, its own included
                i["fraction"] * (i["seconds"] if "start" not in i else i["start"] + i["seconds"] - now)
                for i in info.values()
                if "start" not in i or i["start"] + i["seconds"] > now
            )
            if "start" not in info[job_id]:
                assert job.queue_position and job.waiting_reason and job.dispatch_note
                info[job_id]["estimate"] = job.estimated_start_at


@dataclass
class DayFigures:
    """What the lab day's replay measured, for the report and the assertions."""

    shares: dict[str, float]
    waits: list[float]
    bounds: list[float]
    errors: list[float]
    settled_errors: list[float]
    makespan: float
    utilisation: float
    peak_fraction: float
    busy_time: float


def day_figures(day: LabDayReplay) -> DayFigures:
    info = day.info
    equal = sum(day.got.values()) / len(USERS)
    shares = {user: day.got[user] / equal for user in USERS}
    # waits and start estimates
    waits = [i["start"] - i["submit"] for i in info.values()]
    # Start estimates, as a share of the wait still ahead: the one seen at submission (later submissions of
    # users with a smaller share legitimately overtake it), and the one seen once every job is in.
    errors = [
        abs((i["estimate"] - T0).total_seconds() - i["start"]) / (i["start"] - i["submit"])
        for i in info.values()
        if i.get("estimate") is not None and i["start"] - i["submit"] >= 60
    ]
    settled_errors = [
        abs((i["settled"] - T0).total_seconds() - i["start"]) / (i["start"] - i["settled_at"])
        for i in info.values()
        if i.get("settled") is not None and i["start"] - i["settled_at"] >= 60
    ]
    makespan = max(i["start"] + i["seconds"] for i in info.values())
    utilisation = day.fraction_seconds / (GPUS * makespan)
    # The bound on a wait: the GPU work in the system when the job arrived (its own included), drained at
    # the utilisation reached, plus two aging steps (by then it outranks everything that came later).
    bounds = [i["ahead"] / (GPUS * utilisation) + 2 * day.lab.settings.queue_aging_s for i in info.values()]
    return DayFigures(
        shares, waits, bounds, errors, settled_errors, makespan, utilisation, day.peak_fraction, day.busy_time
    )


def print_day(f: DayFigures) -> None:
    print(
        f"\nreplay: 200 jobs, {GPUS} GPUs x {SLOTS} slots, makespan {f.makespan / 3600:.2f} h, "
        f"GPU memory utilisation {f.utilisation:.0%} (peak fraction on one GPU {f.peak_fraction:.2f})\n"
        f"share of the GPU-seconds held while all {len(USERS)} users had jobs waiting ({f.busy_time / 3600:.2f} h), "
        "equal = 1: "
        + ", ".join(f"{u} {s:.3f}" for u, s in f.shares.items())
        + f"\nwaits: median {statistics.median(f.waits) / 60:.1f} min, max {max(f.waits) / 60:.1f} min; "
        f"worst wait / bound {max(w / b for w, b in zip(f.waits, f.bounds, strict=True)):.2f}\n"
        f"start estimates once every job is in: {len(f.settled_errors)} jobs, median error "
        f"{statistics.median(f.settled_errors):.1%}, p90 {statistics.quantiles(f.settled_errors, n=10)[-1]:.1%}; "
        f"at submission: median error {statistics.median(f.errors):.1%} ({len(f.errors)} jobs)"
    )


def test_a_lab_day_is_packed_fair_bounded_and_forecast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = itertools.count()  # ids in submission order: the replay is the same every run
    monkeypatch.setattr(job_store, "new_id", lambda prefix: f"{prefix}_{next(serial):012d}")
    lab = Lab(tmp_path)
    day = LabDayReplay(lab)
    day.run()
    assert all("start" in i for i in day.info.values()) and len(day.info) == 200
    figures = day_figures(day)
    print_day(figures)
    assert figures.peak_fraction <= 1.0 + 1e-9
    assert all(0.9 <= s <= 1.1 for s in figures.shares.values()), figures.shares
    assert all(w <= b for w, b in zip(figures.waits, figures.bounds, strict=True))
    assert statistics.median(figures.settled_errors) <= 0.25
    lab.db.dispose()


# ── with preemption: priority-2 jobs arriving while low-priority work fills both GPUs ────────────────
URGENT_USER = "eve"
BATCHES_PER_EPOCH = 100
JANITOR_S = 30.0


def urgent_jobs(seed: int = 11) -> list[Submission]:
    """Ten priority-2 whole-GPU jobs of 5–10 minutes (a deadline's runs), one every 20 minutes from the second
    hour: the GPUs are full of the morning's sweeps by then, and a whole GPU frees only when all its jobs end."""
    rng = random.Random(seed)
    return [Submission(3600.0 + 1200.0 * i, URGENT_USER, 2, 1.0, 2, rng.uniform(300, 600)) for i in range(10)]


@dataclass
class Replayed:
    """What one replay measured."""

    waits: dict[str, float]  # job id → seconds from submit to (first) start
    urgent: set[str]
    shares: dict[str, float]
    utilisation: float
    preemptions: list[tuple[str, float, float]] = field(default_factory=list)  # (victim, time, run before it)
    retrained_batches: list[int] = field(default_factory=list)  # per preemption, the trainer's resume


def _submit(lab: Lab, sub: Submission, when: dt.datetime) -> str:
    spec = {"resources": {"gpu": "any", "memory_fraction": sub.fraction}, "training": {"epochs": sub.kind + 1}}
    spec["architecture"] = {"family": "mlp"}
    user, dataset = lab.users[sub.user], lab.datasets[sub.user, sub.kind]
    return lab.db.create_job(user, dataset, spec, max_active=1000, max_attempts=3, priority=sub.priority, now=when).id


def replay(lab: Lab, trace: list[Submission], settings: Settings) -> Replayed:
    """Replay ``trace`` through the real dispatcher; a victim's supervisor stops it at once (SIGTERM →
    checkpoint → requeued), and its resume continues from the weights it reached."""
    ends: list[tuple[float, str]] = []
    info: dict[str, dict] = {}
    on_gpu: dict[str, dict[str, float]] = defaultdict(dict)
    fraction_seconds = 0.0
    got: dict[str, float] = defaultdict(float)
    clock = 0.0
    pending = list(trace)
    out = Replayed({}, set(), {}, 0.0)
    at = lambda seconds: T0 + dt.timedelta(seconds=seconds)  # noqa: E731

    def run_pass(now: float) -> None:
        sent: list[tuple[str, str]] = []
        dispatch(lab.db, settings, lab.gpus(), lambda j, q: sent.append((j, q)), now=at(now))
        for job_id, _queue in sent:
            job = lab.db.get_job(job_id)
            assert lab.db.take_lease(job_id, "w", 10**6, gpu=job.gpu, now=at(now))
            i = info[job_id]
            i.setdefault("first_start", now)
            i["start"], i["gpu"] = now, job.gpu
            on_gpu[job.gpu][job_id] = i["fraction"]
            heapq.heappush(ends, (now + i["left"], job_id))

    def stop_victims(now: float) -> bool:
        stopped = False
        for uuid, jobs in on_gpu.items():
            for job_id in list(jobs):
                if lab.db.stop_request(job_id)[1] is None:
                    continue
                i = info[job_id]
                ran = now - i["start"]
                done = i["seconds"] - i["left"] + ran  # the seconds of training behind it
                per_batch = i["seconds"] / (i["epochs"] * BATCHES_PER_EPOCH)
                batches = int(done // per_batch)
                # The trainer checkpoints at the current batch and its resume re-runs the interrupted epoch
                # from the weights reached: the batches of that epoch already done are trained again.
                retrained = batches % BATCHES_PER_EPOCH
                i["left"] = i["seconds"] - (batches - retrained) * per_batch
                out.preemptions.append((job_id, now, ran))
                out.retrained_batches.append(retrained)
                event = {"event": "preempted", "by": lab.db.stop_request(job_id)[1], "detail": "replay"}
                assert lab.db.requeue_preempted(job_id, "w", event, now=at(now)) == QUEUED
                del on_gpu[uuid][job_id]
                i["stopped"] = i.get("stopped", 0) + 1
                stopped = True
        return stopped

    while pending or ends:
        # The janitor's pass every JANITOR_S while a priority-2 job waits (both modes alike): a waiting job's
        # preempt_after_s runs out between two job ends.
        urgent_waiting = any("start" not in info[j] for j in out.urgent)
        tick = clock + JANITOR_S if urgent_waiting else float("inf")
        now = min(pending[0].at if pending else float("inf"), ends[0][0] if ends else float("inf"), tick)
        fraction_seconds += sum(sum(jobs.values()) for jobs in on_gpu.values()) * (now - clock)
        waiting_users = {i["user"] for i in info.values() if "first_start" not in i}
        if set(USERS) <= waiting_users:
            for jobs in on_gpu.values():
                for job_id, fraction in jobs.items():
                    got[info[job_id]["user"]] += fraction * (now - clock)
        clock = now
        while pending and pending[0].at == now:
            sub = pending.pop(0)
            job_id = _submit(lab, sub, at(now))
            info[job_id] = {"user": sub.user, "submit": now, "fraction": sub.fraction, "seconds": sub.seconds}
            info[job_id].update(left=sub.seconds, epochs=sub.kind + 1)
            if sub.user == URGENT_USER:
                out.urgent.add(job_id)
        while ends and ends[0][0] == now:
            _, job_id = heapq.heappop(ends)
            i = info[job_id]
            if job_id not in on_gpu.get(i.get("gpu") or "", {}) or abs(i["start"] + i["left"] - now) > 1e-6:
                continue  # an end scheduled before the job was preempted
            assert lab.db.finish_job(job_id, "w", "succeeded", now=at(now))
            del on_gpu[i["gpu"]][job_id]
            i["done"] = True
        for jobs in on_gpu.values():
            for job_id in jobs:
                i = info[job_id]
                lab.db.record_progress(job_id, {"stage": "training", "eta_s": i["start"] + i["left"] - now})
        run_pass(now)
        if stop_victims(now):
            run_pass(now)  # the supervisor's dispatch after the victims' release places the preemptor
        for uuid, jobs in on_gpu.items():
            assert sum(jobs.values()) <= 1.0 + 1e-9 and len(jobs) <= SLOTS, f"GPU {uuid} over-committed: {jobs}"
    assert all(i.get("done") for i in info.values())
    out.waits = {job_id: i["first_start"] - i["submit"] for job_id, i in info.items()}
    equal = sum(got[u] for u in USERS) / len(USERS)
    out.shares = {u: got[u] / equal for u in USERS}
    out.utilisation = fraction_seconds / (GPUS * clock)  # the clock stopped at the last end: the makespan
    return out


@pytest.mark.slow
def test_preemption_cuts_urgent_waits_without_costing_shares_or_utilisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = sorted(lab_day() + urgent_jobs())
    results = {}
    for mode in ("off", "on"):
        serial = itertools.count()
        monkeypatch.setattr(job_store, "new_id", lambda prefix, serial=serial: f"{prefix}_{next(serial):012d}")
        lab = Lab(tmp_path / mode)
        user, _ = lab.db.create_user(URGENT_USER)
        lab.db.set_max_priority(URGENT_USER, 2)
        lab.users[URGENT_USER] = user.id
        dataset, _ = lab.db.add_dataset(user.id, "e".ljust(64, "0"), 1, {}, "k/eve")
        lab.datasets[URGENT_USER, 2] = dataset.id
        settings = lab.settings.model_copy(update={"preemption": mode == "on"})
        results[mode] = replay(lab, trace, settings)
        lab.db.dispose()
    off, on = results["off"], results["on"]
    p95 = {m: statistics.quantiles([r.waits[j] for j in r.urgent], n=20)[-1] for m, r in results.items()}
    min_run = Settings().preempt_min_run_s
    by_victim: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for victim, when, ran in on.preemptions:
        by_victim[victim].append((when, ran))
    print(
        f"\nreplay with {len(on.urgent)} priority-2 jobs arriving into full GPUs: urgent wait p95 "
        f"{p95['off'] / 60:.1f} min without preemption, {p95['on'] / 60:.1f} min with; "
        f"{len(on.preemptions)} preemptions of {len(by_victim)} jobs, "
        f"most of one job {max((len(v) for v in by_victim.values()), default=0)}; re-trained batches "
        f"{sum(on.retrained_batches)} in all (the interrupted epochs' batches; 0 for the "
        f"{on.retrained_batches.count(0)} stopped at an epoch's end)\n"
        "shares while all users waited (equal = 1): "
        + ", ".join(f"{u} {off.shares[u]:.3f}/{on.shares[u]:.3f}" for u in USERS)
        + f" (off/on); GPU utilisation {off.utilisation:.1%} without, {on.utilisation:.1%} with"
    )
    for mode, r in results.items():
        print(mode, "urgent waits (s):", sorted(round(r.waits[j]) for j in r.urgent))
    assert p95["on"] < p95["off"]
    assert on.preemptions and not off.preemptions
    for stops in by_victim.values():  # the guard: a run of preempt_min_run_s first, once per min_run_s
        assert all(ran >= min_run for _, ran in stops)
        times = sorted(when for when, _ in stops)
        assert all(b - a >= min_run for a, b in itertools.pairwise(times))
    assert all(0.9 <= s <= 1.1 for s in on.shares.values()), on.shares
    assert on.utilisation >= off.utilisation - 0.005
