"""The study driver (worker/studies.py) against a real job DB and Optuna storage, jobs ended by hand."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from core.settings import Settings
from core.states import CANCELLED, FAILED, PRUNED, QUEUED, RUNNING, SUCCEEDED
from models.data.inspect import inspect_file
from models.space import StudyRequest
from store import Database, DatasetInUse, Job
from store.tables import STUDY_CANCELLED, STUDY_FINISHED
from worker.studies import (
    PRUNER_REASON,
    advance_studies,
    asks_allowed,
    health_prune,
    load_study,
    observe_trial_event,
    optuna_storage,
    tell_decision,
)
from worker.trials import param_importances

REPO = Path(__file__).resolve().parents[2]
HIGHWAY = json.loads((REPO / "examples/specs/highway.json").read_text())


POSTGRES_URL = os.environ.get("GPUYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in the test's folder, or a fresh PostgreSQL database (Optuna's tables go beside gpuyard's in
    the database's default schema, so a schema per test would not hold them)."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'jobs.db').as_posix()}"
        return
    name = f"gpuyard_studies_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} (set GPUYARD_TEST_POSTGRES_URL): {exc.orig}")
    try:
        yield str(make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:  # FORCE: Optuna's pooled connections to it are ended too
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        storage_dir=tmp_path / "storage",
        redis_url="",
        lease_seconds=30,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    database.migrate()
    yield database
    optuna_storage.cache_clear()
    database.dispose()


@pytest.fixture
def owner_and_dataset(db: Database, digits_h5: Path) -> tuple[int, str]:
    user, _token = db.create_user("ada")
    summary = inspect_file(digits_h5)
    dataset, _ = db.add_dataset(user.id, summary.sha256, 1, summary.model_dump(mode="json"), "k", name="digits")
    return user.id, dataset.id


def _study(db: Database, owner_and_dataset: tuple[int, str], **overrides: Any) -> str:
    owner, dataset = owner_and_dataset
    body = {
        "name": "grid",
        "dataset": dataset,
        "spec": HIGHWAY | {"resources": {"gpu": "cpu", "memory_fraction": 0.25}},
        "space": {"architecture.depth": {"choice": [2, 4]}, "architecture.width": {"choice": [32, 64]}},
        "sampler": "grid",
        "max_parallel": 2,
        **overrides,
    }
    request = StudyRequest.model_validate(body)
    return db.create_study(owner, request.name, dataset, request.model_dump(mode="json"), max_active=5).id


def _end(db: Database, job: Job, state: str, *, val_accuracy: float | None = None) -> None:
    assert db.take_lease(job.id, "test", 30) is not None
    if val_accuracy is not None:
        db.record_progress(job.id, {"epoch": 3, "loss": 0.3, "metrics": {"val_accuracy": val_accuracy}})
    assert db.finish_job(job.id, "test", state, None if state == SUCCEEDED else "x")


def _optuna_states(db: Database, study_id: str) -> dict[int, str]:
    study = optuna.load_study(study_name=study_id, storage=optuna_storage(db.url))
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_a_grid_study_runs_max_parallel_trials_at_a_time_and_settles(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(db, owner_and_dataset)
    first = advance_studies(db, settings, [])
    assert len(first.submitted) == 2
    assert not advance_studies(db, settings, []).submitted  # no room: max_parallel 2
    jobs = db.study_jobs(study_id)
    assert [j.trial_number for j in jobs] == [0, 1] and all(j.state == QUEUED for j in jobs)
    points = set()
    for number in range(4):
        jobs = {j.trial_number: j for j in db.study_jobs(study_id)}
        job = jobs[number]
        arch = job.spec["architecture"]
        points.add((arch["depth"], arch["width"]))
        _end(db, job, SUCCEEDED, val_accuracy=0.5 + number / 10)
        advance_studies(db, settings, [])
    assert points == {(2, 32), (2, 64), (4, 32), (4, 64)}  # every grid point once
    assert _optuna_states(db, study_id) == {n: "COMPLETE" for n in range(4)}
    row = db.get_study(study_id)
    assert row is not None and row.state == STUDY_FINISHED and row.finished_at is not None
    best = optuna.load_study(study_name=study_id, storage=optuna_storage(db.url)).best_trial
    assert best.number == 3 and best.value == pytest.approx(0.8)
    importances = param_importances(db, row)
    assert set(importances) == {"architecture.depth", "architecture.width"}
    assert sum(importances.values()) == pytest.approx(1.0)


def test_a_trial_asked_but_never_submitted_is_submitted_once(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(db, owner_and_dataset, max_parallel=1)
    row = db.get_study(study_id)
    assert row is not None
    # A driver killed between Optuna's ask and the job's creation left a RUNNING trial without a job.
    study = load_study(db, row)
    trial = study.ask()
    depth = trial.suggest_categorical("architecture.depth", [2, 4])  # killed before it suggested the width
    report = advance_studies(db, settings, [])
    assert len(report.submitted) == 1  # that trial's job; no new ask (max_parallel 1)
    jobs = db.study_jobs(study_id)
    assert [j.trial_number for j in jobs] == [0]
    assert jobs[0].spec["architecture"]["depth"] == depth and jobs[0].spec["architecture"]["width"] in (32, 64)
    advance_studies(db, settings, [])
    assert len(db.study_jobs(study_id)) == 1  # and never a second one


def test_ended_jobs_are_told_with_their_state(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(db, owner_and_dataset, max_parallel=4)
    advance_studies(db, settings, [])
    jobs = db.study_jobs(study_id)
    _end(db, jobs[0], SUCCEEDED, val_accuracy=0.9)
    _end(db, jobs[1], FAILED)
    # A prune request stops the trial like a cancel; the stop ends pruned, with the reason.
    assert db.take_lease(jobs[2].id, "test", 30) is not None
    assert db.request_prune(jobs[2].id, PRUNER_REASON, "the median pruner stopped it")
    assert not db.request_prune(jobs[2].id, "loss_not_finite", "second reason")  # the first one stands
    assert db.is_cancel_requested(jobs[2].id)
    assert db.finish_job(jobs[2].id, "test", CANCELLED, "cancelled", "stopped")
    pruned = db.get_job(jobs[2].id)
    assert pruned is not None and pruned.state == PRUNED and pruned.error_reason == PRUNER_REASON
    _end(db, jobs[3], SUCCEEDED)  # no objective recorded
    advance_studies(db, settings, [])
    assert _optuna_states(db, study_id) == {0: "COMPLETE", 1: "FAIL", 2: "PRUNED", 3: "FAIL"}


def test_cancelling_a_study_stops_asking_and_settles_it_once_its_trials_are_told(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(db, owner_and_dataset)
    advance_studies(db, settings, [])
    assert db.cancel_study(study_id)
    for job_id in db.active_trial_ids(study_id):
        db.request_cancel(job_id)
    advance_studies(db, settings, [])
    assert len(db.study_jobs(study_id)) == 2
    assert set(_optuna_states(db, study_id).values()) == {"FAIL"}
    row = db.get_study(study_id)
    assert row is not None and row.state == STUDY_CANCELLED and row.finished_at is not None


def test_a_data_set_in_use_by_an_active_study_cannot_be_deleted(
    db: Database, owner_and_dataset: tuple[int, str]
) -> None:
    _study(db, owner_and_dataset)
    with pytest.raises(DatasetInUse):
        db.delete_dataset(owner_and_dataset[1])


def test_epochs_are_reported_and_the_pruner_prunes_a_bad_trial(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(
        db,
        owner_and_dataset,
        sampler="random",
        trials=6,
        max_parallel=6,
        space={"training.optimizer.learning_rate": {"float": [1e-4, 1.0], "log": True}},
    )
    advance_studies(db, settings, [])
    jobs = db.study_jobs(study_id)
    assert len(jobs) == 6
    for job in jobs[:4]:  # four good trials end first: the median pruner has its startup trials
        db.take_lease(job.id, "test", 30)
        for epoch in (1, 2, 3):
            event = {"event": "epoch_end", "epoch": epoch, "loss": 0.5, "metrics": {"val_accuracy": 0.8 + epoch / 100}}
            assert observe_trial_event(db, job.id, study_id, job.trial_number or 0, event) is None
        db.record_progress(job.id, {"loss": 0.5, "metrics": {"val_accuracy": 0.83}})
        db.finish_job(job.id, "test", SUCCEEDED)
    advance_studies(db, settings, [])
    bad = jobs[4]
    db.take_lease(bad.id, "test", 30)
    first = {"event": "epoch_end", "epoch": 1, "loss": 2.0, "metrics": {"val_accuracy": 0.1}}
    assert observe_trial_event(db, bad.id, study_id, bad.trial_number or 0, first) is None  # warm-up step
    second = {"event": "epoch_end", "epoch": 2, "loss": 2.0, "metrics": {"val_accuracy": 0.1}}
    assert observe_trial_event(db, bad.id, study_id, bad.trial_number or 0, second) == PRUNER_REASON
    job = db.get_job(bad.id)
    assert job is not None and job.cancel_requested and job.state == RUNNING
    assert job.prune_detail and "val_accuracy 0.1" in job.prune_detail
    # Health pruning: loss_not_finite is in the default prune_on of a random study.
    nan = jobs[5]
    db.take_lease(nan.id, "test", 30)
    finding = {"kind": "loss_not_finite", "epoch": 1, "detail": "the loss is nan"}
    assert (
        observe_trial_event(db, nan.id, study_id, nan.trial_number or 0, {"event": "health", "findings": [finding]})
        == "loss_not_finite"
    )


def test_a_grid_study_prunes_on_no_health_finding_by_default() -> None:
    grid = StudyRequest.model_validate(
        {"name": "g", "dataset": "d", "spec": {}, "space": {"a": {"choice": [1]}}, "sampler": "grid"}
    )
    random = grid.model_copy(update={"sampler": "random"})
    assert grid.prune_kinds() == [] and random.prune_kinds() == ["loss_not_finite", "vanishing_gradient"]


# ── the pure decisions, as tables ────────────────────────────────────────────────────────────────────────
def _job(state: str, metrics: dict[str, float] | None = None, reason: str | None = None) -> Job:
    return Job(id="job_x", state=state, last_progress={"metrics": metrics or {}, "loss": 0.4}, error_reason=reason)


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (None, None),
        (_job(RUNNING), None),
        (_job(QUEUED), None),
        (_job(SUCCEEDED, {"val_accuracy": 0.93}), ("COMPLETE", 0.93)),
        (_job(SUCCEEDED, {}), ("FAIL", None)),
        (_job(SUCCEEDED, {"val_accuracy": math.nan}), ("FAIL", None)),
        (_job(PRUNED, reason="pruner"), ("PRUNED", None)),
        (_job(FAILED, reason="out_of_memory"), ("FAIL", None)),
        (_job(CANCELLED), ("FAIL", None)),
    ],
)
def test_tell_decision(job: Job | None, expected: tuple[str, float | None] | None) -> None:
    decision = tell_decision(job, "val_accuracy")
    assert (None if decision is None else (decision[0].name, decision[1])) == expected


@pytest.mark.parametrize(
    ("max_parallel", "cap", "total", "asked", "active", "expected"),
    [
        (4, 8, 10, 0, 0, 4),  # an empty study fills max_parallel
        (4, 8, 10, 4, 4, 0),  # full
        (4, 8, 10, 5, 3, 1),  # one ended: one more
        (8, 3, 10, 0, 0, 3),  # clipped to GPUYARD_MAX_PARALLEL_TRIALS
        (4, 8, 5, 4, 1, 1),  # only one trial left to ask
        (4, 8, 5, 5, 0, 0),  # every trial asked
    ],
)
def test_asks_allowed(max_parallel: int, cap: int, total: int, asked: int, active: int, expected: int) -> None:
    request = StudyRequest.model_validate(
        {"name": "s", "dataset": "d", "spec": {}, "space": {"a": {"choice": [1]}}, "max_parallel": max_parallel}
    )
    assert asks_allowed(request, total, asked, active, cap) == expected


@pytest.mark.parametrize(
    ("kinds", "findings", "epoch", "expected"),
    [
        (["loss_not_finite"], [{"kind": "loss_not_finite", "epoch": 2}], 2, "loss_not_finite"),
        (["loss_not_finite"], [{"kind": "loss_not_finite", "epoch": 0}], 0, "loss_not_finite"),  # at once
        (["loss_not_finite"], [{"kind": "dead_units", "epoch": 2}], 2, None),
        ([], [{"kind": "vanishing_gradient", "epoch": 0}], 1, None),  # a grid's default: nothing prunes
        (["vanishing_gradient"], [{"kind": "vanishing_gradient", "epoch": 0}], 0, None),  # not yet: epoch 0 only
        (
            ["vanishing_gradient"],
            [{"kind": "dead_units"}, {"kind": "vanishing_gradient", "epoch": 0}],
            1,
            "vanishing_gradient",  # still current after epoch 1
        ),
        (["vanishing_gradient"], [], 1, None),
    ],
)
def test_health_prune(kinds: list[str], findings: list[dict[str, Any]], epoch: int, expected: str | None) -> None:
    hit = health_prune(kinds, findings, epoch)
    assert (hit[0] if hit else None) == expected


def test_a_pruned_trial_whose_worker_died_ends_pruned_not_requeued(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(db, owner_and_dataset, max_parallel=1)
    advance_studies(db, settings, [])
    job = db.study_jobs(study_id)[0]
    assert db.take_lease(job.id, "test", 1) is not None
    assert db.request_prune(job.id, "loss_not_finite", "loss_not_finite at epoch 1: the loss is nan")
    # The worker was killed before it stopped the trainer: the janitor ends the job as its driver asked.
    report = db.requeue_expired(now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    assert report.requeued == []
    ended = db.get_job(job.id)
    assert ended is not None and (ended.state, ended.error_reason) == (PRUNED, "loss_not_finite")
    events = [e.event for e in db.events_since(job.id)]
    assert events[-1] == {
        "event": "state",
        "state": PRUNED,
        "reason": "loss_not_finite",
        "detail": "loss_not_finite at epoch 1: the loss is nan",
        "time": events[-1]["time"],
    }
    advance_studies(db, settings, [])
    assert _optuna_states(db, study_id)[0] == "PRUNED"
    assert len(db.study_jobs(study_id)) == 2  # its slot went to the next trial in the same pass


def test_a_vanishing_gradient_prunes_when_it_holds_after_the_first_epoch(
    db: Database, settings: Settings, owner_and_dataset: tuple[int, str]
) -> None:
    study_id = _study(
        db, owner_and_dataset, sampler="random", trials=1, max_parallel=1, space={"training.seed": {"int": [0, 9]}}
    )
    advance_studies(db, settings, [])
    job = db.study_jobs(study_id)[0]
    db.take_lease(job.id, "test", 30)
    finding = {"kind": "vanishing_gradient", "epoch": 0, "detail": "ratio 1e-9"}
    health = {"event": "health", "epoch": 0, "findings": [finding]}
    assert observe_trial_event(db, job.id, study_id, 0, health) is None  # epoch 0 alone does not prune
    db.record_progress(job.id, {"health": [finding]})  # what the supervisor keeps as current
    epoch_end = {"event": "epoch_end", "epoch": 1, "loss": 2.3, "metrics": {"val_accuracy": 0.1}}
    assert observe_trial_event(db, job.id, study_id, 0, epoch_end) == "vanishing_gradient"
