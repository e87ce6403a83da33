"""The study driver: Optuna's ask/tell around ordinary jobs, with pruning that frees a GPU at once.

A study (``store.tables.Study``; its request is ``models.space.StudyRequest``) is an Optuna study of the
same name in the same database (Optuna's own tables, ``optuna.storages.RDBStorage`` on
``GPUYARD_DATABASE_URL``). One function moves every study along, :func:`advance_studies`; it runs before
every dispatch pass (:func:`advance_and_dispatch`: after a job ends, in the janitor's pass, after a
study is submitted), so a finished or pruned trial's room goes to the next trial in the same pass::

    for each study not yet settled, holding its driver lease (one process at a time):
      reconcile   every RUNNING Optuna trial has a job (a driver killed between ask and submit made
                  none: it is submitted now, from the trial's stored params; the unique
                  (study_id, trial_number) index makes a second submit impossible); a trial whose job
                  ended is told: succeeded → the objective's last value, pruned → PRUNED, else FAIL
      ask         while the study is active with fewer than max_parallel trials queued or running and
                  fewer than ``trials`` asked: ask, build the spec, submit the job
      settle      every trial asked and told (or the study cancelled and its trials told): finished_at

Each epoch's objective goes to Optuna as it is relayed (:func:`observe_trial_event`, called by the
supervisor for trial jobs): ``trial.report``; when the pruner says so, or a health finding of the study's
``prune_on`` arrives, the job gets a prune request (``Database.request_prune``): its supervisor stops the
trainer as for a cancel (checkpoint, exit), and the job ends ``pruned`` with the reason.

Caps (docs/studies.md): trials do not count against ``GPUYARD_MAX_ACTIVE_JOBS_PER_USER`` one by one; a study
holds at most ``max_parallel`` (≤ ``GPUYARD_MAX_PARALLEL_TRIALS``) queued or running trials, a user at most
``GPUYARD_MAX_ACTIVE_STUDIES_PER_USER`` active studies, and every trial is an ordinary job for the
dispatcher: fair share orders it against colleagues' jobs and ``GPUYARD_MAX_GPU_FRACTION_PER_USER`` bounds
what the owner holds, so a study fills a free box and yields a busy one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import optuna
from sqlalchemy.exc import IntegrityError

from core.errors import SpecError
from core.settings import Settings
from core.states import ACTIVE_STATES, PRUNED, SUCCEEDED, TERMINAL_STATES
from models.data.summary import DatasetSummary
from models.fit import spec_data_problems
from models.health import VANISHING_GRADIENT
from models.size import size_problems
from models.space import Dimension, SpaceError, StudyRequest, apply_params, distribution_key, value_of
from models.spec import AUTO, parse_spec
from store import Database, Job, Study
from store.errors import JobDBError
from store.tables import STUDY_ACTIVE
from worker.dispatch import Dispatcher, DispatchReport
from worker.placement import GpuView, never_fits
from worker.sizing import auto_budget

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: How long one driver pass may hold a study before another process may take it over.
DRIVER_LEASE_S = 60.0
#: The events of a trial job the driver reads as they are relayed.
TRIAL_EVENTS = ("epoch_end", "health")
PRUNER_REASON = "pruner"
_STATE_OF: dict[str, optuna.trial.TrialState] = {
    SUCCEEDED: optuna.trial.TrialState.COMPLETE,
    PRUNED: optuna.trial.TrialState.PRUNED,
}


@dataclass
class AdvanceReport:
    """What one :func:`advance_studies` pass did."""

    submitted: list[str] = field(default_factory=list)
    told: dict[int, str] = field(default_factory=dict)
    settled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ── Optuna ────────────────────────────────────────────────────────────────────────────────────────────────
@lru_cache(maxsize=4)
def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage in the job database (its own tables; one engine per process and URL).

    Optuna records its schema revision in Alembic's default ``alembic_version`` table; gpuyard keeps its own
    in ``gpuyard_alembic_version`` (store/migrations.py), so the two never read each other's.
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 30}}  # the file is in WAL mode already (store/engine.py)
    for attempt in range(3):  # two processes creating Optuna's tables at once: one of them loses, once
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def sampler_for(request: StudyRequest, dims: Sequence[Dimension], asked: int) -> optuna.samplers.BaseSampler:
    """The study's sampler for its next ask. Seeded by (seed, trials asked so far): every process draws the
    same next point, and no two asks of one study draw from the same seed."""
    seed = (request.seed * 1_000_003 + asked) % 2**31
    if request.sampler == "grid":
        return optuna.samplers.GridSampler({d.path: _grid_values(d) for d in dims}, seed=request.seed)
    if request.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, request.max_parallel)))


def pruner_for(request: StudyRequest) -> optuna.pruners.BasePruner:
    """The study's pruner: median (after 3 finished trials, from the second epoch on), hyperband, or none."""
    if request.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if request.pruner == "hyperband":
        epochs = int((request.spec.get("training") or {}).get("epochs") or 20)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2))
    return optuna.pruners.NopPruner()


def _grid_values(dim: Dimension) -> list[Any]:
    return distribution_key(dim) if dim.kind == "choice" else dim.grid_values()


def load_study(db: Database, row: Study, *, asked: int = 0) -> optuna.Study:
    """The Optuna study of ``row`` (created on first use), with its sampler and pruner."""
    request = StudyRequest.model_validate(row.request)
    dims = request.dimensions()
    return optuna.create_study(
        storage=optuna_storage(db.url),
        study_name=row.id,
        direction=request.objective.direction,
        sampler=sampler_for(request, dims, asked),
        pruner=pruner_for(request),
        load_if_exists=True,
    )


def suggest(trial: optuna.trial.Trial, dims: Sequence[Dimension]) -> dict[str, Any]:
    """Ask ``trial`` for a value of every dimension; the point (spec values, sub-objects for choices by index)."""
    point: dict[str, Any] = {}
    for dim in dims:
        if dim.kind == "choice":
            point[dim.path] = value_of(dim, trial.suggest_categorical(dim.path, distribution_key(dim)))
        elif dim.kind == "int":
            point[dim.path] = trial.suggest_int(dim.path, int(dim.low), int(dim.high), step=dim.step, log=dim.log)
        else:
            point[dim.path] = trial.suggest_float(dim.path, float(dim.low), float(dim.high), log=dim.log)
    return point


def point_of(params: Mapping[str, Any], dims: Sequence[Dimension]) -> dict[str, Any]:
    """The point of a stored trial's params (what :func:`suggest` returned when it was asked)."""
    return {d.path: value_of(d, params[d.path]) for d in dims if d.path in params}


def objective_value(job: Job, metric: str) -> float | None:
    """The objective's last per-epoch value of a job (``loss`` or a key of the epoch's ``metrics``)."""
    progress = job.last_progress or {}
    value = progress.get("loss") if metric == "loss" else (progress.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def epoch_value(event: Mapping[str, Any], metric: str) -> float | None:
    """The objective's value in one ``epoch_end`` event (NaN for a non-finite or missing loss)."""
    value = event.get("loss") if metric == "loss" else (event.get("metrics") or {}).get(metric)
    if value is None and metric == "loss":
        return math.nan
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ── decisions (pure) ─────────────────────────────────────────────────────────────────────────────────────
def tell_decision(job: Job | None, metric: str) -> tuple[optuna.trial.TrialState, float | None, str] | None:
    """How a RUNNING Optuna trial's job ended: (state, value, reason) to tell, or None while it runs (or
    has no job yet)."""
    if job is None or job.state not in TERMINAL_STATES:
        return None
    if job.state == SUCCEEDED:
        value = objective_value(job, metric)
        if value is None or not math.isfinite(value):
            return optuna.trial.TrialState.FAIL, None, f"objective_missing: no finite {metric} in its last epoch"
        return optuna.trial.TrialState.COMPLETE, value, SUCCEEDED
    state = _STATE_OF.get(job.state, optuna.trial.TrialState.FAIL)
    return state, None, f"{job.state}: {job.error_reason or ''}".rstrip(": ")


def asks_allowed(request: StudyRequest, total: int, asked: int, active: int, max_parallel_cap: int) -> int:
    """How many trials to ask now: room under ``max_parallel`` (clipped to the deployment's cap) and under
    the study's trial count."""
    parallel = min(request.max_parallel, max_parallel_cap)
    return max(0, min(parallel - active, total - asked))


def health_prune(kinds: Sequence[str], findings: Sequence[Mapping[str, Any]], epoch: int) -> tuple[str, str] | None:
    """The (reason, detail) to prune on, given the trial's current health findings after ``epoch`` epochs
    (0: before training), or None.

    A kind of ``kinds`` prunes at once, but ``vanishing_gradient`` only once it held at epochs 0 and 1: a
    fresh net's first gradients may be small for one epoch and recover (the trainer reports a finding when
    it is news, so a finding still current after epoch 1 held there too).
    """
    for finding in findings:
        kind = finding.get("kind")
        if kind not in kinds or (kind == VANISHING_GRADIENT and epoch < 1):
            continue
        detail = f"{kind} at epoch {finding.get('epoch')}: {finding.get('detail') or ''}".strip()
        return str(kind), detail.rstrip(":")
    return None


# ── trial jobs ───────────────────────────────────────────────────────────────────────────────────────────
def trial_spec(request: StudyRequest, dims: Sequence[Dimension], point: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of one trial: the base spec with the point applied, named after the study and trial."""
    return apply_params(request.spec, list(dims), point)


def submit_trial(
    db: Database,
    settings: Settings,
    gpus: Sequence[GpuView],
    row: Study,
    number: int,
    spec_obj: dict[str, Any],
) -> Job:
    """Queue trial ``number`` of a study as a job, checked as a submitted job is (spec, fit to the data
    set's summary, size, memory sizing, placement). The one place a trial becomes a job.

    Returns:
        The trial's job (the existing one when it was submitted already).

    Raises:
        SpecError: the trial's spec fails a check (the trial is then told FAIL by the caller).
    """
    existing = next((j for j in db.study_jobs(row.id) if j.trial_number == number), None)
    if existing is not None:
        return existing
    request = StudyRequest.model_validate(row.request)
    spec = parse_spec(spec_obj)
    dataset = db.get_dataset(row.dataset_id or "")
    if dataset is None:
        raise SpecError("the study's data set was deleted")
    summary = DatasetSummary.model_validate(dataset.summary)
    problems = spec_data_problems(spec, summary) if spec.data == summary.keys else []
    problems += size_problems(spec, list(summary.input_shape), summary.output_dim, settings)
    if problems:
        raise SpecError(problems)
    spec_json = spec.model_dump(mode="json")
    if spec_json["resources"]["max_runtime_s"] is None and settings.default_max_runtime_s:
        spec_json["resources"]["max_runtime_s"] = settings.default_max_runtime_s
    sized = None
    if spec.resources.memory_fraction == AUTO:
        sized = auto_budget(db, settings, spec, summary, gpus)
        spec_json["resources"]["memory_fraction"] = sized.memory_fraction
    never = never_fits(spec_json, gpus, settings)
    if never:
        raise SpecError(never)
    try:
        job = db.create_job(
            row.owner_id,
            dataset.id,
            spec_json,
            max_active=settings.max_active_jobs_per_user,
            max_attempts=settings.max_attempts,
            priority=request.priority,
            memory_fraction_auto=sized is not None,
            notify=[],
            study_id=row.id,
            trial_number=number,
        )
    except IntegrityError:  # another driver submitted it a moment ago
        found = next((j for j in db.study_jobs(row.id) if j.trial_number == number), None)
        if found is None:
            raise
        return found
    if sized is not None and sized.sized:
        db.append_event(
            job.id, {"event": "memory_sized", "memory_fraction": sized.memory_fraction, "detail": sized.detail}
        )
    return job


# ── the driver ───────────────────────────────────────────────────────────────────────────────────────────
def advance_studies(db: Database, settings: Settings, gpus: Sequence[GpuView]) -> AdvanceReport:
    """One pass over every study not yet settled (see the module's docstring). Never asks a trial a study
    has no room for; safe to run in many processes at once (one holds a study at a time)."""
    report = AdvanceReport()
    driver = f"{socket.gethostname()}:{os.getpid()}"
    for study_id in db.unsettled_study_ids():
        if not db.take_study_driver(study_id, driver, DRIVER_LEASE_S):
            report.skipped.append(study_id)
            continue
        try:
            _advance_one(db, settings, gpus, study_id, report)
        except JobDBError:
            raise
        except Exception:  # one broken study must not stop the others, nor the dispatch pass after it
            log.exception("study %s: driver pass failed", study_id)
        finally:
            db.release_study_driver(study_id, driver)
    return report


def _advance_one(
    db: Database, settings: Settings, gpus: Sequence[GpuView], study_id: str, report: AdvanceReport
) -> None:
    row = db.get_study(study_id)
    if row is None:
        return
    request = StudyRequest.model_validate(row.request)
    dims = request.dimensions()
    study = load_study(db, row)
    jobs = {j.trial_number: j for j in db.study_jobs(study_id)}
    trials = study.get_trials(deepcopy=False)
    for frozen in trials:
        if frozen.state != optuna.trial.TrialState.RUNNING:
            continue
        job = jobs.get(frozen.number)
        if job is None:  # asked, never submitted (the driver died in between): submit it now
            # Suggesting again returns what was stored and samples only what a killed driver never reached.
            study.sampler = sampler_for(request, dims, frozen.number)
            point = suggest(optuna.trial.Trial(study, frozen._trial_id), dims)
            job = _submit_or_fail(db, settings, gpus, row, study, frozen.number, point, report)
            if job is None:
                continue
            jobs[frozen.number] = job
        decision = tell_decision(job, request.objective.metric)
        if decision is not None:
            _tell(study, frozen, job, decision)
            report.told[frozen.number] = decision[0].name
    active = sum(1 for j in jobs.values() if j.state in ACTIVE_STATES)
    total = request.trial_count(dims)
    if row.state == STUDY_ACTIVE:
        for _ in range(asks_allowed(request, total, len(trials), active, settings.max_parallel_trials)):
            asked = len(study.get_trials(deepcopy=False))
            study.sampler = sampler_for(request, dims, asked)
            trial = study.ask()
            point = suggest(trial, dims)
            trial.set_user_attr("point", point)
            _submit_or_fail(db, settings, gpus, row, study, trial.number, point, report)
    trials = study.get_trials(deepcopy=False)
    running = any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    if not running and (row.state != STUDY_ACTIVE or len(trials) >= total) and db.settle_study(study_id):
        report.settled.append(study_id)


def _submit_or_fail(
    db: Database,
    settings: Settings,
    gpus: Sequence[GpuView],
    row: Study,
    study: optuna.Study,
    number: int,
    point: dict[str, Any],
    report: AdvanceReport,
) -> Job | None:
    request = StudyRequest.model_validate(row.request)
    try:
        job = submit_trial(db, settings, gpus, row, number, trial_spec(request, request.dimensions(), point))
    except (SpecError, SpaceError) as exc:
        problems = getattr(exc, "problems", [])
        reason = "; ".join(p.detail for p in problems) or str(exc)
        log.warning("study %s: trial %d refused: %s", row.id, number, reason)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        study._storage.set_trial_user_attr(trial_id, "reason", f"spec_invalid: {reason}"[:500])
        _tell_plain(study, number, optuna.trial.TrialState.FAIL, None)
        report.told[number] = "FAIL"
        return None
    report.submitted.append(job.id)
    return job


def _tell(
    study: optuna.Study,
    frozen: optuna.trial.FrozenTrial,
    job: Job,
    decision: tuple[optuna.trial.TrialState, float | None, str],
) -> None:
    state, value, reason = decision
    storage = study._storage
    storage.set_trial_user_attr(frozen._trial_id, "job", job.id)
    storage.set_trial_user_attr(frozen._trial_id, "reason", reason[:500])
    _tell_plain(study, frozen.number, state, value)


def _tell_plain(study: optuna.Study, number: int, state: optuna.trial.TrialState, value: float | None) -> None:
    # Told outside study.optimize: the grid sampler's after_trial would call study.stop() (a RuntimeError
    # there) once the grid is used up. The driver counts trials itself, so a neutral sampler hears the tell.
    sampler, study.sampler = study.sampler, optuna.samplers.RandomSampler()
    try:
        if state == optuna.trial.TrialState.COMPLETE:
            study.tell(number, value, skip_if_finished=True)
        else:
            study.tell(number, state=state, skip_if_finished=True)
    finally:
        study.sampler = sampler


def advance_and_dispatch(dispatcher: Dispatcher, *, recover: bool = False) -> DispatchReport:
    """Advance every study (new trials are queued), then the dispatch pass that places them: what runs
    after a job ends, in the janitor's pass and after a study is submitted. A broken study pass is logged;
    the dispatch pass runs regardless."""
    try:
        advance_studies(dispatcher.db, dispatcher.settings, dispatcher.gpus())
    except Exception:  # the queue must move even when the study side cannot
        log.exception("studies: driver pass failed")
    return dispatcher.run(recover=recover)


# ── epochs and health as they are relayed ────────────────────────────────────────────────────────────────
@lru_cache(maxsize=256)
def _request_of(db: Database, study_id: str) -> StudyRequest | None:
    row = db.get_study(study_id)
    return StudyRequest.model_validate(row.request) if row is not None else None


def observe_trial_event(
    db: Database, job_id: str, study_id: str, trial_number: int, event: Mapping[str, Any]
) -> str | None:
    """Read one relayed event of a trial job: an ``epoch_end`` reports the objective to Optuna (and asks
    the pruner), a ``health`` event with a kind of ``prune_on`` prunes at once.

    Returns:
        The prune reason when this event made the job's prune request, else None.
    """
    request = _request_of(db, study_id)
    if request is None:
        return None
    kind = event.get("event")
    kinds = request.prune_kinds()
    if kind == "health":
        hit = health_prune(kinds, event.get("findings") or [], int(event.get("epoch") or 0))
        return hit[0] if hit is not None and db.request_prune(job_id, *hit) else None
    if kind != "epoch_end":
        return None
    if VANISHING_GRADIENT in kinds and event.get("epoch") == 1:  # the finding of epoch 0, if still current
        job = db.get_job(job_id)
        current = ((job.last_progress or {}).get("health") or []) if job is not None else []
        hit = health_prune(kinds, current, 1)
        if hit is not None and db.request_prune(job_id, *hit):
            return hit[0]
    value = epoch_value(event, request.objective.metric)
    step = event.get("epoch")
    if value is None or not isinstance(step, int):
        return None
    storage = optuna_storage(db.url)
    optuna_study_id = storage.get_study_id_from_name(study_id)
    trial_id = storage.get_trial_id_from_study_id_trial_number(optuna_study_id, trial_number)
    if storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
        return None
    study = optuna.load_study(study_name=study_id, storage=storage, pruner=pruner_for(request))
    trial = optuna.trial.Trial(study, trial_id)
    trial.report(value, step)
    if request.pruner != "none" and trial.should_prune():
        detail = (
            f"the {request.pruner} pruner stopped it after epoch {step}: {request.objective.metric} {value:.4g} "
            f"is worse than the other trials at that epoch"
        )
        if db.request_prune(job_id, PRUNER_REASON, detail):
            return PRUNER_REASON
    return None
