"""Fault injection: ``gpuyard up`` on a fake GPU loses each of its process types to SIGKILL mid-job, once
each (trainer, Celery pool child, Celery main, API worker, API master, janitor, Redis), and every job
still ends ``succeeded``, with never two trainers alive for one job.

What must hold after each kill: the stack answers ``/v1/ready`` again and has that process type again
(``gpuyard up`` restarts its direct children, gunicorn and Celery their own; a job whose trainer or
supervisor died is retried from its checkpoint). A thread watches the trainers all along (psutil, every
0.1 s); each attempt's trainer log header is counted afterwards.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from api_helpers import free_port
from fault_helpers import (
    FAULT_SPEC,
    KILL_ORDER,
    TrainerWatch,
    kill,
    processes,
    recovered,
    trainer_job,
    wait_until,
)
from stack_helpers import RunningStack, gpuyard_up

from core.names import TRAINER_LOG
from core.states import SUCCEEDED

pytestmark = pytest.mark.slow
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")

STACK_ENV = {
    "GPUYARD_FAKE_GPUS": "1x16GiB",
    "GPUYARD_JANITOR_INTERVAL_S": "1",
    "GPUYARD_LEASE_SECONDS": "15",  # a supervisor killed with its pool child: the janitor requeues after this
}


class Api:
    """The stack's API as the admin, retrying while a killed API process is replaced."""

    def __init__(self, stack: RunningStack) -> None:
        self.url = stack.url
        token = (stack.data_dir / "admin-token").read_text().strip()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        deadline = time.monotonic() + 90
        while True:
            try:
                response = self.session.request(method, self.url + path, timeout=30, **kwargs)
                if response.status_code < 500 or time.monotonic() > deadline:
                    return response
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def submit(self, dataset: str) -> str:
        response = self.call("POST", "/v1/jobs", json={"dataset": dataset, "spec": FAULT_SPEC})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())


def supervised_trainers(stack: RunningStack, min_age_s: float) -> list[psutil.Process]:
    """Trainers alive for at least ``min_age_s`` (past their framework import: mid-job) whose parent is a
    Celery pool child under a Celery main process (not an orphan of an earlier kill)."""
    found = processes(stack)
    kind = {p.pid: k for k, procs in found.items() for p in procs}
    parent = {p.pid: p.ppid() for procs in found.values() for p in procs}
    now = time.time()
    return [
        t
        for t in found.get("trainer", [])
        if now - t.create_time() >= min_age_s
        and kind.get(parent[t.pid]) == "pool_child"
        and kind.get(parent.get(parent[t.pid], -1)) == "celery_main"
    ]


def attempt_headers(stack: RunningStack, job_id: str) -> list[int]:
    log = stack.data_dir / "storage" / "jobs" / job_id / TRAINER_LOG
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [int(n) for n in re.findall(r"=== gpuyard attempt (\d+) ", text)]


def run_kill_trials(
    stack: RunningStack,
    api: Api,
    dataset: str,
    kinds: tuple[str, ...],
    *,
    between: Callable[[str], None] = lambda _: None,
) -> tuple[list[str], dict[str, float]]:
    """Kill each process type in ``kinds`` once while a trainer is mid-job; returns the jobs submitted and
    the seconds each kill took to recover from."""
    jobs: list[str] = []
    took: dict[str, float] = {}

    def active() -> list[str]:
        return [j for j in jobs if api.job(j)["state"] not in ("succeeded", "failed", "cancelled", "interrupted")]

    def detail() -> str:
        return f"processes: { {k: [p.pid for p in v] for k, v in processes(stack).items()} }\n" + stack.output()[-3000:]

    for what in kinds:
        while len(active()) < 2:
            jobs.append(api.submit(dataset))
        trainers = wait_until(
            lambda: supervised_trainers(stack, 4.0), 240, f"a supervised trainer mid-job before killing {what}", detail
        )
        # The victim: the trainer of the job with the fewest attempts so far (a job gets 3), or its processes.
        attempts = {j: api.job(j)["attempts"] for j in {trainer_job(t.cmdline()) for t in trainers} if j}
        trainer = min(trainers, key=lambda t: attempts.get(trainer_job(t.cmdline()) or "", 99))
        pool_child = psutil.Process(trainer.ppid())
        celery_main = psutil.Process(pool_child.ppid())
        victim = {"trainer": trainer, "pool_child": pool_child, "celery_main": celery_main}.get(what)
        started = time.monotonic()
        killed = kill(stack, what, (lambda _, v=victim: v) if victim is not None else None)
        wait_until(lambda k=killed: recovered(stack, k), 240, f"a new {what} after {killed}", detail)
        took[what] = round(time.monotonic() - started, 1)
        between(what)
    return jobs, took


def test_each_process_type_killed_mid_job_and_every_job_succeeds(tmp_path: Path, digits_h5: Path) -> None:
    started = time.monotonic()
    with gpuyard_up(tmp_path / "stack", free_port(), env=STACK_ENV) as stack:
        api = Api(stack)
        upload = api.call(
            "POST", "/v1/datasets", data=digits_h5.read_bytes(), headers={"Content-Type": "application/x-hdf5"}
        )
        assert upload.status_code in (200, 201), upload.text
        dataset = upload.json()["id"]
        watch = TrainerWatch(stack).start()
        try:
            jobs, took = run_kill_trials(stack, api, dataset, KILL_ORDER)
            wait_until(
                lambda: all(api.job(j)["state"] in ("succeeded", "failed", "interrupted", "cancelled") for j in jobs),
                300,
                "every job to end",
                lambda: stack.output()[-3000:],
            )
        finally:
            watch.stop()
        final = {j: api.job(j) for j in jobs}
        headers = {j: attempt_headers(stack, j) for j in jobs}
    print(f"fault injection: {len(jobs)} jobs, recovery seconds {took}, total {time.monotonic() - started:.0f} s")
    assert {j: (f["state"], f["error_reason"]) for j, f in final.items()} == {j: (SUCCEEDED, None) for j in jobs}
    assert watch.overlaps == [], watch.overlaps
    assert set(watch.groups) <= set(jobs)
    for job_id, found in headers.items():
        # One trainer start per attempt, in order: no attempt ran twice.
        assert found == list(range(found[0], found[0] + len(found))) and len(found) == len(set(found)), (job_id, found)
        assert len(watch.groups[job_id]) <= final[job_id]["attempts"], (job_id, watch.groups[job_id], final[job_id])


# ── PostgreSQL: kill trials, then the database refusing connections mid-job ───────────────────────────
POSTGRES_ADMIN_URL = os.environ.get("GPUYARD_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
OUTAGE_S = 30.0


@pytest.fixture
def postgres_url() -> Iterator[tuple[str, Any]]:
    """A database of the test's own on the PostgreSQL server (trust login as ``postgres``), dropped after;
    yields its SQLAlchemy URL and an autocommit admin connection to the server's ``postgres`` database."""
    import psycopg  # the dev extra's PostgreSQL driver

    name = f"gpuyard_faults_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL} (GPUYARD_TEST_POSTGRES_ADMIN_URL): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://{admin.info.user}@127.0.0.1:{admin.info.port}/{name}", admin
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def refuse_connections(admin: Any, database: str) -> int:
    """``ALLOW_CONNECTIONS false`` on ``database`` and end every session on it; returns how many ended."""
    admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    row = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.postgres
def test_postgres_survives_kills_and_a_30_s_outage_mid_job(
    tmp_path: Path, digits_h5: Path, postgres_url: tuple[str, Any]
) -> None:
    url, admin = postgres_url
    database = url.rsplit("/", 1)[1]
    started = time.monotonic()
    # The default 60 s lease outlives the outage (renewed every 20 s): a running job keeps its trainer.
    env = {**STACK_ENV, "GPUYARD_LEASE_SECONDS": "60", "GPUYARD_DATABASE_URL": url}
    with gpuyard_up(tmp_path / "stack", free_port(), env=env) as stack:
        api = Api(stack)
        upload = api.call(
            "POST", "/v1/datasets", data=digits_h5.read_bytes(), headers={"Content-Type": "application/x-hdf5"}
        )
        assert upload.status_code in (200, 201), upload.text
        dataset = upload.json()["id"]
        watch = TrainerWatch(stack).start()
        try:
            # Kills that need no lease to lapse (the SQLite test covers the rest with a short lease).
            jobs, took = run_kill_trials(stack, api, dataset, ("trainer", "api_worker", "api_master", "janitor"))
            while len([j for j in jobs if api.job(j)["state"] not in FINISHED]) < 2:
                jobs.append(api.submit(dataset))
            wait_until(lambda: supervised_trainers(stack, 4.0), 240, "a trainer mid-job before the outage")
            running = {j: api.job(j)["attempts"] for j in jobs if api.job(j)["state"] == "running"}
            output_before = len(stack.output())
            mid_outage: list[tuple[int, Any]] = []
            terminated = refuse_connections(admin, database)
            outage_began = time.monotonic()
            try:
                while time.monotonic() - outage_began < OUTAGE_S:
                    try:
                        response = requests.get(stack.url + "/v1/jobs", headers=api.session.headers, timeout=20)
                        mid_outage.append((response.status_code, response.json()))
                    except (requests.RequestException, ValueError) as exc:
                        mid_outage.append((0, repr(exc)))
                    time.sleep(1)
            finally:
                admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            recovered_at = wait_until(lambda: api.job(jobs[0]).get("id"), 60, "the API after the outage")
            assert recovered_at
            jobs.append(api.submit(dataset))  # a new submit works without a restart
            wait_until(
                lambda: all(api.job(j)["state"] in FINISHED for j in jobs),
                420,
                "every job to end",
                lambda: stack.output()[-3000:],
            )
        finally:
            watch.stop()
        final = {j: api.job(j) for j in jobs}
        headers = {j: attempt_headers(stack, j) for j in jobs}
        restarts = [line for line in stack.output()[output_before:].splitlines() if "restarted (pid" in line]
    print(
        f"postgres faults: {len(jobs)} jobs, recovery seconds {took}, {terminated} sessions ended, "
        f"mid-outage answers {[s for s, _ in mid_outage]}, total {time.monotonic() - started:.0f} s"
    )
    statuses = {status for status, _ in mid_outage}
    assert statuses == {503}, mid_outage  # every answer meanwhile: 503, JSON, saying why
    assert all(body.get("error") == "database_unavailable" for _, body in mid_outage), mid_outage
    assert {j: (f["state"], f["error_reason"]) for j, f in final.items()} == {j: (SUCCEEDED, None) for j in jobs}
    assert watch.overlaps == [], watch.overlaps
    for job_id, found in headers.items():
        assert found == list(range(found[0], found[0] + len(found))), (job_id, found)
        assert len(watch.groups[job_id]) <= final[job_id]["attempts"], (job_id, watch.groups[job_id], final[job_id])
    assert restarts == [], restarts  # nothing was restarted for the outage
    # The jobs running when the database went away kept their attempt: none was run again.
    assert {j: final[j]["attempts"] for j in running} == running, (running, final)
