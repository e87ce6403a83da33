"""A study's trials as the API, the CLI and the dashboard show them: Optuna's trials joined with their jobs."""

from __future__ import annotations

import datetime as dt
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna

from core.states import FAILED, PRUNED, SUCCEEDED
from models.space import StudyRequest
from store import Database, Job, Study
from worker.studies import objective_value, optuna_storage, point_of

#: A trial Optuna asked whose job does not exist (yet): shown with this state.
ASKED = "asked"
#: Completed trials before parameter importances mean anything.
MIN_TRIALS_FOR_IMPORTANCE = 4


@dataclass
class TrialView:
    """One trial: its number, the point it tried, its job and how it stands."""

    number: int
    state: str  # the job's state; ASKED before its job exists; FAILED for a trial refused before it ran
    params: dict[str, Any]
    value: float | None
    reason: str | None
    detail: str | None
    job: str | None
    optuna_state: str
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    intermediate: dict[int, float] = field(default_factory=dict)


@dataclass
class StudyView:
    """A study with every trial, the counts by state and its best trial."""

    row: Study
    request: StudyRequest
    total: int
    trials: list[TrialView]
    best: TrialView | None

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts


def study_view(db: Database, row: Study) -> StudyView:
    """The study as it stands: Optuna's trials (params, values) beside their jobs (state, reason)."""
    request = StudyRequest.model_validate(row.request)
    dims = request.dimensions()
    jobs = {j.trial_number: j for j in db.study_jobs(row.id)}
    storage = optuna_storage(db.url)
    try:
        study = optuna.load_study(study_name=row.id, storage=storage)
        frozen = study.get_trials(deepcopy=False)
    except KeyError:  # no trial asked yet: Optuna has not heard of the study
        frozen = []
    trials = [_trial(t, jobs.get(t.number), dims, request) for t in frozen]
    done = [t for t in trials if t.state == SUCCEEDED and t.value is not None]
    best = None
    if done:
        pick = max if request.objective.direction == "maximize" else min
        best = pick(done, key=lambda t: t.value or 0.0)
    return StudyView(row, request, request.trial_count(dims), trials, best)


def param_importances(db: Database, row: Study) -> dict[str, float]:
    """Optuna's parameter importances of the study's completed trials (PED-ANOVA: milliseconds, where the
    default fANOVA forest takes seconds); empty until :data:`MIN_TRIALS_FOR_IMPORTANCE` have completed
    (with fewer, Optuna can only call every parameter equally important)."""
    try:
        study = optuna.load_study(study_name=row.id, storage=optuna_storage(db.url))
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
            return {}
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "too few trials": the count above already says so
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (KeyError, ValueError, RuntimeError):  # no such study yet, or nothing varies
        return {}


def _trial(frozen: optuna.trial.FrozenTrial, job: Job | None, dims: Any, request: StudyRequest) -> TrialView:
    attrs = frozen.user_attrs
    point = attrs.get("point") or point_of(frozen.params, dims)
    if job is None:
        failed = frozen.state == optuna.trial.TrialState.FAIL
        return TrialView(
            frozen.number,
            FAILED if failed else ASKED,
            point,
            None,
            "spec_invalid" if failed else None,
            attrs.get("reason"),
            None,
            frozen.state.name,
        )
    value = (
        frozen.value
        if frozen.state == optuna.trial.TrialState.COMPLETE
        else objective_value(job, request.objective.metric)
    )
    if value is not None and not math.isfinite(value):
        value = None
    return TrialView(
        number=frozen.number,
        state=job.state,
        params=point,
        value=value,
        reason=job.error_reason or (job.prune_reason if job.state == PRUNED else None),
        detail=job.error_detail,
        job=job.id,
        optuna_state=frozen.state.name,
        started_at=job.started_at,
        finished_at=job.finished_at,
        intermediate={int(k): float(v) for k, v in frozen.intermediate_values.items() if math.isfinite(v)},
    )
