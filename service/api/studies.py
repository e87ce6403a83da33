"""/v1/studies: submit (or dry-run) a study, list and show studies with their trials, cancel one.

A study is checked whole at submit: every trial spec it could produce (every grid point; the corners of a
space with ranges) is validated and size-checked as a submitted job is, so a space that reaches a model
over the limits is refused with the field and value, before anything runs. The trials themselves are asked
and queued by the study driver (worker/studies.py), at most ``max_parallel`` at a time.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request, url_for

from core.errors import Problem, SpecError
from core.states import QUEUED
from models.data.summary import DatasetSummary
from models.fit import spec_data_problems
from models.size import estimated_training_bytes, model_size, size_problems
from models.space import SpaceError, StudyRequest, apply_params, corner_points, grid_points, point_label
from models.spec import AUTO, JobSpec, parse_spec
from service.api import json_body, respond
from service.api.declare import documented, query_param
from service.auth import authenticate, current_user, visible_owner_id
from service.errors import NotFound, Unprocessable
from service.extensions import services
from service.schemas import PlacementOut, StudyDryRunOut, StudyListOut, StudyOut, TrialOut
from store import Dataset, Job, Study, utcnow
from worker.dispatch import decide_queue, dispatch
from worker.placement import GpuView, gpu_views, never_fits
from worker.studies import advance_studies
from worker.trials import StudyView, TrialView, study_view

bp = Blueprint("studies", __name__, url_prefix="/v1/studies")
bp.before_request(authenticate)


@bp.post("")
@documented(
    "submitStudy",
    summary="Check a study (every grid point or corner) and queue its first trials; ?dry_run=1 queues nothing",
    body=StudyRequest,
    params=(query_param("dry_run", {"type": "boolean"}, "Check only: trial count, largest trial, first placements"),),
    responses={201: (StudyOut, "Accepted"), 200: (StudyDryRunOut, "Dry run")},
    errors=(400, 401, 404, 422, 429),
)
def submit() -> Response:
    """Check and record a study (201), then queue its first trials; ``?dry_run=1`` answers the trial count,
    the largest trial's estimate and where the first ``max_parallel`` trials would start (200).

    422 names the space path or spec field and the value at fault (every grid point, or every corner of a
    space with ranges, is checked as a submitted job is); 404 when the data set is not the caller's; 429
    at the per-user cap of active studies.
    """
    svc = services()
    body = json_body(StudyRequest)
    try:
        dims = body.dimensions()
        total = body.trial_count(dims)
        points = grid_points(dims) if body.sampler == "grid" else corner_points(dims)
    except SpaceError as exc:
        raise Unprocessable.from_problems(exc.code, exc.problems) from exc
    dataset = svc.db.get_dataset(body.dataset, visible_owner_id())
    if dataset is None:
        raise NotFound(f"no data set {body.dataset!r}; upload one with POST /v1/datasets", field="dataset")
    user = current_user()
    if body.priority > user.max_priority:
        raise Unprocessable(
            f"priority {body.priority} is above your max_priority {user.max_priority}",
            field="priority",
            code="priority_too_high",
        )
    gpus = gpu_views(svc.db, svc.heartbeats)
    specs, largest = _check_points(body, dims, points, dataset, gpus)
    parallel = min(body.max_parallel, svc.settings.max_parallel_trials, total)
    if request.args.get("dry_run", "").lower() in ("1", "true", "yes"):
        first = _would_start(specs, parallel, dataset.id, body.priority, gpus)
        return respond(
            StudyDryRunOut(trials=total, max_parallel=parallel, checked=len(points), largest=largest, first=first)
        )
    study = svc.db.create_study(
        user.id,
        body.name,
        dataset.id,
        body.model_dump(mode="json"),
        max_active=svc.settings.max_active_studies_per_user,
    )
    advance_studies(svc.db, svc.settings, gpus)
    dispatch(svc.db, svc.settings, gpus, svc.send, wake=svc.wake)
    view = study_view(svc.db, svc.db.get_study(study.id) or study)
    return respond(study_out(view, full=True), 201, {"Location": url_for("studies.show", study_id=study.id)})


def _check_points(
    body: StudyRequest,
    dims: Any,
    points: list[dict[str, Any]],
    dataset: Dataset,
    gpus: list[GpuView],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every point's spec checked as a submitted job's; the specs, and the largest one's estimate.

    Raises:
        Unprocessable: the first point whose spec fails, naming it and every problem.
    """
    svc = services()
    summaries: dict[str, DatasetSummary] = {}
    stored = DatasetSummary.model_validate(dataset.summary)
    specs: list[dict[str, Any]] = []
    largest: dict[str, Any] | None = None
    for point in points:
        try:
            spec = parse_spec(apply_params(body.spec, dims, point))
        except SpecError as exc:
            raise _refused(exc.code, exc.problems, point) from exc
        key = spec.data.model_dump_json()
        if key not in summaries:
            summaries[key] = stored if spec.data == stored.keys else _rechecked(spec, dataset)
        summary = summaries[key]
        problems = spec_data_problems(spec, summary)
        if problems:
            raise _refused("spec_invalid", problems, point)
        too_large = size_problems(spec, list(summary.input_shape), summary.output_dim, svc.settings)
        if too_large:
            raise _refused("model_too_large", too_large, point)
        spec_json = spec.model_dump(mode="json")
        if spec.resources.memory_fraction != AUTO:
            never = never_fits(spec_json, gpus, svc.settings)
            if never:
                raise _refused("never_fits", never, point)
        else:
            spec_json["resources"]["memory_fraction"] = 0.25  # a placeholder for the forecast only
        specs.append(spec_json)
        estimate = _estimate(spec, summary, point)
        if estimate and (largest is None or estimate["training_bytes"] > largest["training_bytes"]):
            largest = estimate
    return specs, largest


def _rechecked(spec: JobSpec, dataset: Dataset) -> DatasetSummary:
    svc = services()
    return svc.check_dataset(svc.storage.local_path(dataset.storage_key), spec.data, dataset.sha256)


def _estimate(spec: JobSpec, summary: DatasetSummary, point: dict[str, Any]) -> dict[str, Any] | None:
    size = model_size(spec, list(summary.input_shape), summary.output_dim)
    if size is None:
        return None
    return {"params": point, "parameters": size.parameters, "training_bytes": estimated_training_bytes(spec, size)}


def _refused(code: str, problems: list[Problem], point: dict[str, Any]) -> Unprocessable:
    """A 422 for a trial spec: each problem's detail says which trial (the point) and keeps its field."""
    label = point_label(point)
    named = [
        Problem(p.code, f"the trial with {label}: {p.detail}", f"spec.{p.field}" if p.field else None) for p in problems
    ]
    return Unprocessable.from_problems(code, named)


def _would_start(
    specs: list[dict[str, Any]], count: int, dataset_id: str, priority: int, gpus: list[GpuView]
) -> list[PlacementOut]:
    """Where the first ``count`` trials would start if submitted now (the largest specs first: the
    pessimistic forecast; nothing is written)."""
    svc = services()
    now = utcnow()
    ranked = sorted(specs, key=lambda s: -float(s["resources"].get("memory_fraction") or 0))[:count]
    probes = [
        Job(
            id=f"dry_run_{i}",
            owner_id=current_user().id,
            dataset_id=dataset_id,
            spec=spec,
            state=QUEUED,
            priority=priority,
            queued_at=now,
            attempts=0,
        )
        for i, spec in enumerate(ranked)
    ]
    with svc.db.peek_queue() as txn:
        decided = decide_queue(txn, svc.settings, gpus, now, extras=probes)
    going = {p.job_id: p.gpu for p in decided.plan.placements}
    out = []
    for probe in probes:
        if probe.id in going:
            out.append(PlacementOut(gpu=going[probe.id], estimated_start_at=now, detail="would start now"))
        else:
            out.append(
                PlacementOut(
                    gpu=None,
                    estimated_start_at=decided.starts.get(probe.id),
                    waiting_reason=decided.plan.reasons.get(probe.id),
                    detail=decided.plan.notes.get(probe.id),
                )
            )
    return out


@bp.get("")
@documented("listStudies", summary="Your studies (an admin's: everyone's)", responses={200: StudyListOut})
def index() -> Response:
    """The caller's studies (an admin's: everyone's), newest first, with their counts and best trial."""
    svc = services()
    rows = svc.db.list_studies(visible_owner_id())
    return respond(StudyListOut(studies=[study_out(study_view(svc.db, row)) for row in rows]))


@bp.get("/<study_id>")
@documented("getStudy", summary="One study with every trial", responses={200: StudyOut}, errors=(401, 404))
def show(study_id: str) -> Response:
    """One study: its request, every trial (params, state, objective, reason, job) and the best one."""
    return respond(study_out(study_view(services().db, visible_study(study_id)), full=True))


@bp.post("/<study_id>/cancel")
@documented(
    "cancelStudy",
    summary="Cancel a study and its queued and running trials",
    responses={200: StudyOut},
    errors=(401, 404),
)
def cancel(study_id: str) -> Response:
    """Cancel a study: no new trial is asked; its queued trials are cancelled at once, its running ones
    stopped by their workers (checkpoint, exit). Optuna hears each end on the driver's next pass."""
    svc = services()
    row = visible_study(study_id)
    svc.db.cancel_study(row.id)
    for job_id in svc.db.active_trial_ids(row.id):
        svc.db.request_cancel(job_id)
    return respond(study_out(study_view(svc.db, visible_study(study_id)), full=True))


def visible_study(study_id: str) -> Study:
    """The study if the caller may see it (an admin sees every study), else 404."""
    row = services().db.get_study(study_id, visible_owner_id())
    if row is None:
        raise NotFound(f"no study {study_id!r}")
    return row


def study_out(view: StudyView, *, full: bool = False) -> StudyOut:
    """The study as the API shows it; ``full`` adds every trial and the request."""
    row, req = view.row, view.request
    return StudyOut(
        id=row.id,
        name=row.name,
        owner=row.owner.name,
        state=row.state,
        dataset=row.dataset_id,
        created_at=row.created_at,
        finished_at=row.finished_at,
        sampler=req.sampler,
        pruner=req.pruner,
        objective=req.objective.model_dump(),
        trials_total=view.total,
        max_parallel=min(req.max_parallel, services().settings.max_parallel_trials, view.total),
        prune_on=req.prune_kinds(),
        counts=view.counts(),
        best=trial_out(view.best) if view.best else None,
        trials=[trial_out(t) for t in view.trials] if full else None,
        request=row.request if full else None,
    )


def trial_out(trial: TrialView) -> TrialOut:
    return TrialOut(**trial.__dict__)
