"""Submitting a job, as one operation: what ``POST /v1/jobs`` (the dashboard's submit page and ``gpuyard
submit`` post there) runs once the request is parsed and the caller may use the data set.

::

    check_submission   the spec fits the data set (its stored summary, or a sandboxed check with the spec's
         │             own keys) → the model's size limits → priority within the owner's → a backend some
         │             worker runs → memory_fraction 'auto' sized → never_fits (a GPU could ever hold it)
         ├─ dry run:   dry_run_report (the trainer's --dry-run, out of process) + would_start (where and
         │             when it would start now: the dispatcher's pure decision on a Proposal; nothing written)
         └─ submit:    submit_job: create_job → memory_sized event → dispatch (a queue that refuses the task:
                       the job is marked interrupted, QueueUnavailable)

Refusals are :class:`~worker.errors.SubmitRefused` (422 with its code), ``SpecError`` / ``DataError``
(422), the store's ``ActiveJobLimit`` (429) and ``QueueUnavailable`` (503); the API maps each.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import Problem, SpecError
from core.settings import Settings
from models.data.summary import DataKeys, DatasetSummary
from models.fit import spec_data_problems
from models.size import size_problems
from models.spec import AUTO, JobSpec
from store import Database, Dataset, Job, User, utcnow
from worker.dispatch import decide_queue, dispatch
from worker.errors import QueueUnavailable, SubmitRefused
from worker.placement import GpuView, never_fits
from worker.queues import Sender
from worker.sizing import AutoBudget, auto_budget
from worker.storage import Storage

#: Checks a data set file with other keys, in the sandbox: (path, keys, its sha256) → its summary.
DatasetChecker = Callable[[Path, DataKeys, str | None], DatasetSummary]
#: Runs the trainer's dry run: (spec, data path, summary) → the ``dry_run`` event's fields.
DryRunner = Callable[[dict[str, Any], Path, DatasetSummary], dict[str, Any]]


@dataclass(frozen=True)
class Submission:
    """A checked submission: the spec as it will be stored (defaults filled, 'auto' sized) and what was
    learned on the way."""

    owner_id: int
    dataset: Dataset
    spec: dict[str, Any]
    summary: DatasetSummary
    priority: int
    sized: AutoBudget | None
    gpus: Sequence[GpuView] = field(default_factory=list)


@dataclass(frozen=True)
class Proposal:
    """A job not submitted yet, as the queue sees it (``worker.placement.QueuedJob``): no row, no id in the
    job store; the dispatcher's pure decision places it beside the stored ones."""

    owner_id: int
    dataset_id: str | None
    spec: dict[str, Any]
    priority: int
    queued_at: dt.datetime
    id: str = "proposed"
    gpu: str | None = None
    preempted_by: str | None = None


@dataclass(frozen=True)
class Placement:
    """Where a job would start now (``gpu``), or its place, reason and estimated start in the queue."""

    gpu: str | None
    estimated_start_at: dt.datetime | None
    waiting_reason: str | None = None
    detail: str | None = None
    queue_position: int | None = None


def check_submission(
    db: Database,
    settings: Settings,
    *,
    user: User,
    dataset: Dataset,
    spec: JobSpec,
    priority: int,
    gpus: Sequence[GpuView],
    storage: Storage,
    check_dataset: DatasetChecker,
) -> Submission:
    """Every check a job passes before it is queued or dry-run, in the order the API answers them.

    Raises:
        SpecError: the spec does not fit the data set (every reason).
        DataError: the data set refused with the spec's own keys.
        SubmitRefused: the model is too large, the priority above the user's, a pin without may_pin, no
            worker runs the backend, or no GPU could ever hold the job.
    """
    summary = _fits_dataset(spec, dataset, storage, check_dataset)
    size = size_problems(spec, list(summary.input_shape), summary.output_dim, settings)
    if size:  # before anything is built, dry run included
        raise SubmitRefused(size, code="model_too_large", prefix="spec.")
    if priority > user.max_priority:
        raise SubmitRefused(
            f"priority {priority} is above your max_priority {user.max_priority}; ask an admin "
            "(gpuyard users set-priority) or submit at most that",
            field="priority",
            code="priority_too_high",
        )
    if not spec.resources.preemptible and not user.may_pin:
        raise SubmitRefused(
            "resources.preemptible false: you may not pin jobs against preemption; ask an admin "
            "(gpuyard users set-priority NAME N --may-pin) or leave it true",
            field="spec.resources.preemptible",
            code="pin_not_allowed",
        )
    spec_json = spec.model_dump(mode="json")
    if spec_json["resources"]["max_runtime_s"] is None and settings.default_max_runtime_s:
        spec_json["resources"]["max_runtime_s"] = settings.default_max_runtime_s
    _check_backend(spec, gpus)
    sized = None
    if spec.resources.memory_fraction == AUTO:
        sized = auto_budget(db, settings, spec, summary, gpus)
        spec_json["resources"]["memory_fraction"] = sized.memory_fraction
    never = never_fits(spec_json, gpus, settings)
    if never:
        raise SubmitRefused(never, code="never_fits", prefix="spec.")
    return Submission(user.id, dataset, spec_json, summary, priority, sized, list(gpus))


def _fits_dataset(spec: JobSpec, dataset: Dataset, storage: Storage, check_dataset: DatasetChecker) -> DatasetSummary:
    """The data set's summary for the spec's keys, refusing (every reason) a spec that cannot fit it.

    The stored summary was checked with the keys given at upload; a spec naming other keys (or declaring
    classes) has the file checked again, in the sandbox, with its own.
    """
    summary = DatasetSummary.model_validate(dataset.summary)
    if spec.data != summary.keys:
        summary = check_dataset(storage.local_path(dataset.storage_key), spec.data, dataset.sha256)
    problems = spec_data_problems(spec, summary)
    if problems:
        raise SpecError(problems)
    return summary


def _check_backend(spec: JobSpec, gpus: Sequence[GpuView]) -> None:
    """Refuse a backend no registered worker runs (listing those that exist); one that only offline workers
    run is accepted and waits (``no_worker_for_backend``). Unknown where no worker reported any."""
    backends = {b for g in gpus for b in (g.backends or (g.row.backends if g.row is not None else None) or ())}
    wanted = spec.resources.backend
    if spec.resources.gpu != "cpu" and backends and wanted not in backends:
        raise SubmitRefused(
            f"resources.backend: no worker runs {wanted!r}; the workers run: {', '.join(sorted(backends))}",
            field="spec.resources.backend",
            code="no_worker_for_backend",
        )


def dry_run_report(submission: Submission, storage: Storage, run: DryRunner) -> dict[str, Any]:
    """The trainer's dry run of a checked submission (``report``, ``env``).

    Raises:
        SpecError: the model could not be built for this data (every reason the report gives).
    """
    data_path = storage.local_path(submission.dataset.storage_key)
    result = run(submission.spec, data_path, submission.summary)
    report = result.get("report") or {}
    if report.get("ok") is False:
        errors = report.get("errors") or [{"code": "dry_run_failed", "detail": "the dry run failed"}]
        raise SpecError([Problem(e.get("code", "invalid"), e.get("detail", ""), e.get("field")) for e in errors])
    return result


def would_start(
    db: Database, settings: Settings, submission: Submission, *, now: dt.datetime | None = None
) -> Placement:
    """Where and when this job would start if submitted now: a forecast, nothing is written."""
    now = now or utcnow()
    proposal = Proposal(
        owner_id=submission.owner_id,
        dataset_id=submission.dataset.id,
        spec=submission.spec,
        priority=submission.priority,
        queued_at=now,
    )
    with db.peek_queue() as txn:
        decided = decide_queue(txn, settings, submission.gpus, now, extra=proposal)
    going = {p.job_id: p.gpu for p in decided.plan.placements}
    if proposal.id in going:
        return Placement(gpu=going[proposal.id], estimated_start_at=now, detail="would start now")
    position = [t.id for t in decided.order if t.id in decided.plan.notes].index(proposal.id) + 1
    return Placement(
        gpu=None,
        estimated_start_at=decided.starts.get(proposal.id),
        waiting_reason=decided.plan.reasons.get(proposal.id),
        detail=decided.plan.notes.get(proposal.id),
        queue_position=position,
    )


def submit_job(
    db: Database,
    settings: Settings,
    submission: Submission,
    *,
    notify: list[str] | None,
    send: Sender,
    wake: Callable[[str], None] | None = None,
) -> Job:
    """Queue a checked submission and dispatch at once (it starts now when a GPU has room).

    Raises:
        ActiveJobLimit: the owner is at the per-user cap of queued + running jobs.
        QueueUnavailable: the queue refused its task; the job is marked interrupted.
    """
    job = db.create_job(
        submission.owner_id,
        submission.dataset.id,
        submission.spec,
        max_active=settings.max_active_jobs_per_user,
        max_attempts=settings.max_attempts,
        priority=submission.priority,
        memory_fraction_auto=submission.sized is not None,
        notify=notify,
    )
    sized = submission.sized
    if sized is not None and sized.sized:
        event = {"event": "memory_sized", "memory_fraction": sized.memory_fraction, "detail": sized.detail}
        db.append_event(job.id, event)
    report = dispatch(db, settings, submission.gpus, send, wake=wake)
    for placement, exc in report.failed:
        if placement.job_id == job.id:
            detail = str(exc) if isinstance(exc, QueueUnavailable) else f"{type(exc).__name__}: {exc}"
            db.interrupt_queued(job.id, "queue_unavailable", detail)
            raise QueueUnavailable(f"the job queue is unreachable ({detail}); the job was not started") from exc
    return db.get_job(job.id) or job
