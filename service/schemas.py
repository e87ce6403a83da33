"""The API's request and response bodies as pydantic models; /openapi.json is generated from them."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from core.names import EXPORT_FORMATS
from core.states import QUEUED, RUNNING, JobState
from models.data.summary import DatasetSummary
from store import Dataset, Job, JobEvent, Operation

# allOf: a bare $ref beside a description would make pydantic resolve the ref, which lives elsewhere.
SpecObject = Annotated[dict[str, Any], WithJsonSchema({"allOf": [{"$ref": "#/components/schemas/JobSpec"}]})]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


NOTIFY_URL_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://"


def _splits_as_url(url: str) -> str:
    """``url`` if ``urllib`` can take it apart (``a://[`` cannot: an unclosed IPv6 bracket)."""
    try:
        urlsplit(url).hostname  # noqa: B018 (parsing is the check)
    except ValueError as exc:
        raise ValueError(f"Expected a URL that parses. Received: {url!r:.80} ({exc})") from exc
    return url


NotifyUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048, pattern=NOTIFY_URL_PATTERN),
    AfterValidator(_splits_as_url),
    Field(description="A webhook (http(s)://) or apprise URL (scheme://...)."),
]
"""One notify URL as the API documents it: what no scheme can accept (empty, no ``scheme://``) is refused by
the schema itself, so the published document says so; worker/notify.py checks the rest."""


# ── errors ──
class ProblemOut(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. 'missing_key', 'greater_than'.")
    detail: str = Field(description="What was wrong, naming the field and value received, and what was expected.")
    field: str | None = Field(None, description="Dotted path of the field or HDF5 key at fault.")


class ErrorOut(BaseModel):
    """Every error response (4xx and 5xx) has this body."""

    error: str = Field(description="Machine-readable error code, e.g. 'not_found', 'spec_invalid'.")
    detail: str = Field(description="A sentence saying what was wrong and what was expected.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")
    problems: list[ProblemOut] | None = Field(None, description="Every problem found (422 responses).")


# ── health ──
class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="Per dependency (database, redis): 'ok' or what failed.")


# ── data sets ──
class DatasetOut(BaseModel):
    id: str
    owner: str
    name: str | None = Field(None, description="The uploaded file's name, if one was given.")
    sha256: str
    size_bytes: int
    summary: DatasetSummary
    created_at: dt.datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        return cls(
            id=dataset.id,
            owner=dataset.owner.name,
            name=dataset.name,
            sha256=dataset.sha256,
            size_bytes=dataset.size_bytes,
            summary=DatasetSummary.model_validate(dataset.summary),
            created_at=dataset.created_at,
        )


class DatasetListOut(BaseModel):
    datasets: list[DatasetOut]


class DatasetUploadQuery(_Body):
    """Optional query parameters of an upload: the HDF5 keys to check (defaults: X_train, Y_train, ...)."""

    name: str | None = Field(None, max_length=255, description="A name to remember the upload by.")
    x_train: str | None = None
    y_train: str | None = None
    x_val: str | None = None
    y_val: str | None = None
    x_test: str | None = None
    y_test: str | None = None
    num_classes: int | None = Field(None, ge=2)


# ── users ──
class QuotaOut(BaseModel):
    """A user's GPU-hour quota and use (GPU-hours: memory fraction × hours on a GPU)."""

    gpu_hours: float | None = Field(description="The quota per period; null: none.")
    period: str | None = Field(description="week or month (the last 7 or 30 days); null: no quota.")
    used_gpu_hours: float = Field(description="GPU-hours used in the period (the last 30 days without a quota).")
    over_quota: bool = Field(
        description="Over it, jobs run only on room nobody else waits for, and go first "
        "when a preemption needs victims."
    )


class UserOut(BaseModel):
    """The caller's account: its notification defaults (never its token or webhook secret)."""

    name: str
    is_admin: bool
    notify: list[str] = Field(description="The notify URLs of your jobs that name none of their own.")
    has_webhook_secret: bool = Field(description="Whether a webhook signing secret exists (rotate to see one).")
    max_priority: int = Field(0, description="The highest priority you may give a job.")
    may_pin: bool = Field(False, description="Whether you may submit resources.preemptible false.")
    quota: QuotaOut | None = Field(None, description="Your GPU-hour quota and use.")


class UsageRowOut(BaseModel):
    key: str = Field(description="The user name, the day (YYYY-MM-DD, UTC) or the GPU UUID.")
    gpu_seconds: float = Field(description="memory fraction × seconds held, summed over the attempts.")
    gpu_hours: float
    attempts: int = Field(description="Attempts (or, by day, attempt-days) counted in the group.")


class UsageOut(BaseModel):
    """GET /v1/usage: GPU time from the jobs' recorded attempts."""

    start: dt.datetime = Field(alias="from", serialization_alias="from")
    end: dt.datetime = Field(alias="to", serialization_alias="to")
    group_by: str
    rows: list[UsageRowOut]


class NotifyIn(_Body):
    """PUT /v1/users/me/notify: the default notify URLs of your jobs ([] for none)."""

    notify: list[NotifyUrl]


class WebhookSecretOut(BaseModel):
    """Shown once, when created: webhooks carry ``X-Gpuyard-Signature: sha256=<hex HMAC-SHA256 of the body>``."""

    secret: str
    header: str = Field(description="The header that carries the signature.")


# ── jobs ──
class JobCreate(_Body):
    """POST /v1/jobs: a data set id and a job spec."""

    dataset: str = Field(description="Id of one of your data sets (POST /v1/datasets).")
    spec: SpecObject = Field(description="The job spec (see the JobSpec schema).")
    priority: int = Field(
        0,
        ge=-100,
        le=100,
        description="Higher goes first; at most your max_priority (an admin sets it; default 0). "
        "Within a priority the queue is ordered by fair share (see README).",
    )
    notify: list[NotifyUrl] | None = Field(
        None,
        description="URLs told when the job ends (succeeded, failed, cancelled, interrupted): http(s):// webhooks "
        "(a signed JSON POST) or apprise URLs (slack://, mailto://, ...). Absent: your default list "
        "(PUT /v1/users/me/notify); []: none.",
    )


class JobProgress(BaseModel):
    model_config = ConfigDict(extra="allow")

    epoch: int | None = None
    loss: float | None = None
    metrics: dict[str, float | None] | None = None
    final_metrics: dict[str, dict[str, float | None] | None] | None = Field(
        None, description="When the job finished: metrics per split (train, val, test)."
    )
    samples_per_s: float | None = None
    eta_s: float | None = None


class JobOut(BaseModel):
    id: str
    owner: str
    state: JobState
    spec: SpecObject
    dataset: str | None = Field(description="The data set's id; null once the data set was deleted.")
    priority: int
    attempts: int
    max_attempts: int
    gpu: str | None = Field(description="GPU UUID or 'cpu' of the latest attempt.")
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    cancel_requested: bool
    progress: JobProgress | None = Field(description="The latest epoch's progress.")
    error_reason: str | None = Field(description="Machine-readable reason of a failed/interrupted/cancelled job.")
    error_detail: str | None
    exit_code: int | None = Field(description="The trainer's exit code (see core.exitcodes).")
    peak_gpu_memory_bytes: int | None = Field(
        description="The most GPU memory the job's processes held at once (the watchdog's readings)."
    )
    dispatched_at: dt.datetime | None = Field(
        None, description="When the dispatcher placed the job on `gpu` (null while it waits for room)."
    )
    queue_position: int | None = Field(
        None,
        description="1-based place among the jobs waiting for a GPU (priority, then fair share, then FIFO); "
        "null once dispatched.",
    )
    waiting_reason: str | None = Field(
        None,
        description="Why a queued job still waits, machine-readable: gpu_full, behind_earlier_job, "
        "user_fraction_cap, gpu_draining, gpu_offline, unknown_gpu, no_worker_for_backend, queue_unreachable, "
        "over_quota, 'preempting <jobs>' (lower-priority jobs are stopping for it), 'preempted_by <job>' (it was "
        "stopped for that job: also shown while it is being stopped).",
    )
    preemptions: int = Field(0, description="How often the job was preempted (each resumed; no attempt counted).")
    dispatch_note: str | None = Field(None, description="Why a queued job is still waiting, as a sentence.")
    estimated_start_at: dt.datetime | None = Field(
        None,
        description="When a waiting job should start, replaying the dispatcher over the running jobs' ETAs and "
        "the expected durations of the jobs ahead; null when no online GPU could run it.",
    )
    memory_fraction_auto: bool = Field(
        False, description="Whether gpuyard sized resources.memory_fraction (the spec said 'auto' or nothing)."
    )
    suggested_memory_fraction: float | None = Field(
        None,
        description="For a finished job: its measured GPU memory peak plus a margin, as a fraction of its GPU: "
        "what to ask for next time.",
    )
    study: str | None = Field(None, description="The study this job is a trial of (null for a plain job).")
    trial: int | None = Field(None, description="Its trial number in that study.")
    health: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The trainer's current health findings (the last `health` event): each with kind "
        "(vanishing_gradient, exploding_gradient, dead_units, snn_drift, loss_not_finite), epoch, value, "
        "threshold, blocks, detail and remedy. Empty when nothing was found.",
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        waiting = job.state == QUEUED and job.dispatched_at is None
        return cls(
            id=job.id,
            owner=job.owner.name,
            state=job.state,
            spec=job.spec,
            dataset=job.dataset_id,
            priority=job.priority,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            gpu=job.gpu,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            cancel_requested=job.cancel_requested,
            progress=JobProgress.model_validate(_without_health(job.last_progress)) if job.last_progress else None,
            error_reason=job.error_reason,
            error_detail=job.error_detail,
            exit_code=job.exit_code,
            peak_gpu_memory_bytes=job.peak_gpu_memory_bytes,
            dispatched_at=job.dispatched_at,
            queue_position=job.queue_position if waiting else None,
            waiting_reason=job.waiting_reason if waiting or (job.state == RUNNING and job.preempted_by) else None,
            preemptions=job.preemptions or 0,
            dispatch_note=job.dispatch_note if job.state == QUEUED else None,
            estimated_start_at=job.estimated_start_at if waiting else None,
            memory_fraction_auto=bool(job.memory_fraction_auto),
            suggested_memory_fraction=job.suggested_memory_fraction,
            study=job.study_id,
            trial=job.trial_number,
            health=list((job.last_progress or {}).get("health") or []),
        )


def _without_health(progress: dict[str, Any]) -> dict[str, Any]:
    """The job's ``last_progress`` without the health findings (the job's ``health`` field shows them)."""
    return {k: v for k, v in progress.items() if k != "health"}


class JobListQuery(_Body):
    state: JobState | None = Field(None, description="Only jobs in this state.")
    limit: int = Field(50, ge=1, le=200, description="Jobs per page.")
    cursor: str | None = Field(None, description="The previous page's next_cursor.")


class JobListOut(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class DryRunOut(BaseModel):
    """POST /v1/jobs?dry_run=1: what the job would build; nothing is queued."""

    dry_run: Literal[True] = True
    dataset: str
    spec: SpecObject = Field(description="The spec as validated (aliases replaced by full names).")
    report: dict[str, Any] | None = Field(
        description="The trainer's dry-run report: parameters, layer table, memory estimate, warnings."
    )
    env: dict[str, Any] | None = Field(None, description="The environment the trainer would set up.")
    placement: PlacementOut | None = Field(None, description="Where and when the job would start if submitted now.")
    memory: str | None = Field(None, description="How memory_fraction 'auto' was sized, when it was asked for.")


class PlacementOut(BaseModel):
    """A dry run's forecast: the GPU it would start on now, or its place, reason and estimated start."""

    gpu: str | None = Field(description="The GPU (or 'cpu') it would be placed on now; null when it would wait.")
    estimated_start_at: dt.datetime | None
    waiting_reason: str | None = None
    detail: str | None = None
    queue_position: int | None = None


# ── GPUs ──
class GpuProcessOut(BaseModel):
    pid: int
    memory_bytes: int


class GpuJobOut(BaseModel):
    """A job on a GPU. Another user's job is shown to a non-admin as anonymous usage: id and owner null."""

    id: str | None = Field(description="The job's id; null for another user's job (unless the caller is an admin).")
    owner: str | None = Field(description="Its owner's name; null for another user's job (unless an admin asks).")
    state: JobState
    memory_fraction: float
    budget_bytes: int = Field(description="memory_fraction × the GPU's total + the context allowance.")
    memory_bytes: int | None = Field(description="GPU memory its processes hold now (null: not measured).")


class GpuOut(BaseModel):
    uuid: str
    host: str
    index: int = Field(description="NVML index (PCI bus order) on its host.")
    name: str
    state: Literal["online", "offline", "draining", "quarantined"] = Field(
        description="quarantined (failed a hygiene check) > draining (admin) > online (heartbeat) > offline."
    )
    online: bool = Field(description="Whether its worker's heartbeat is live.")
    slots: int | None = Field(description="Jobs its worker runs at once.")
    memory_total_bytes: int
    memory_used_bytes: int | None
    utilization_percent: int | None
    fraction_committed: float = Field(description="Sum of memory_fraction of its running and dispatched jobs.")
    jobs: list[GpuJobOut]
    foreign_processes: list[GpuProcessOut] = Field(description="Processes on it that gpuyard did not start.")
    draining_since: dt.datetime | None
    quarantined_since: dt.datetime | None
    quarantine_reason: str | None
    heartbeat_at: float | None = Field(description="Unix time of its last heartbeat.")


class GpuListOut(BaseModel):
    gpus: list[GpuOut]


class JobEventOut(BaseModel):
    """One Server-Sent Event of GET /v1/jobs/{id}/events: ``id:`` is ``seq``, ``event:`` the event's name,
    ``data:`` this object's ``event`` field as JSON."""

    seq: int
    time: dt.datetime
    event: dict[str, Any]

    @classmethod
    def of(cls, job_event: JobEvent) -> JobEventOut:
        return cls(seq=job_event.seq, time=job_event.time, event=job_event.event)


# ── model operations (evaluate, predict, export a finished job's model) ──
OperationKind = Literal["evaluate", "predict", "export"]
Split = Literal["test", "val", "train"]
ExportFormat = Literal[EXPORT_FORMATS]  # type: ignore[valid-type]  # a Literal of a constant tuple: pydantic reads it


class EvaluateIn(_Body):
    """POST /v1/jobs/<id>/evaluate: a data set to measure the job's model on."""

    dataset: str = Field(description="Id of one of your data sets with the model's input shape and targets.")
    split: Split = Field("test", description="Which split of the data set: test (default), val or train.")


class PredictIn(_Body):
    """POST /v1/jobs/<id>/predict as JSON: rows of inputs (or send an HDF5 file with an X dataset)."""

    inputs: list[Any] = Field(
        min_length=1, description="One row per sample, each of the model's input shape (nested lists of numbers)."
    )


class ExportIn(_Body):
    """POST /v1/jobs/<id>/export: the formats to write as artifacts."""

    formats: list[ExportFormat] = Field(
        min_length=1, description=f"Any of {', '.join(EXPORT_FORMATS)}; each becomes a downloadable artifact."
    )


class OperationOut(BaseModel):
    """One model operation: queued, then running in a worker, then succeeded (``result``) or failed."""

    id: str
    job: str
    kind: OperationKind
    state: JobState = Field(description="queued, running, succeeded or failed.")
    request: dict[str, Any] = Field(description="What was asked: dataset and split, rows, or formats.")
    result: dict[str, Any] | None = Field(
        description="evaluate: split, rows, metrics (loss, accuracy, ...); predict: rows, predictions and, "
        "for a classifier, classes; export: artifacts by format."
    )
    error_reason: str | None
    error_detail: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, operation: Operation) -> OperationOut:
        return cls(
            id=operation.id,
            job=operation.job_id,
            kind=operation.kind,
            state=operation.state,
            request={k: v for k, v in operation.request.items() if k != "input_file"},
            result=operation.result,
            error_reason=operation.error_reason,
            error_detail=operation.error_detail,
            created_at=operation.created_at,
            started_at=operation.started_at,
            finished_at=operation.finished_at,
        )


# ── studies ──
class TrialOut(BaseModel):
    number: int = Field(description="Optuna's trial number, 0, 1, 2, ... in the order asked.")
    state: str = Field(
        description="The trial's job state; asked before its job exists; failed if refused before it ran."
    )
    params: dict[str, Any] = Field(description="The point it tries: every searched path and its value.")
    value: float | None = Field(description="The objective: the final value once succeeded, else the latest epoch's.")
    reason: str | None = Field(description="Why it ended as it did (pruner, loss_not_finite, out_of_memory, ...).")
    detail: str | None
    job: str | None = Field(description="Its job's id (GET /v1/jobs/<id>).")
    optuna_state: str = Field(description="Optuna's state of the trial: RUNNING, COMPLETE, PRUNED or FAIL.")
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    intermediate: dict[int, float] = Field(description="The objective per epoch, as reported to Optuna.")


class StudyOut(BaseModel):
    id: str
    name: str
    owner: str
    state: str = Field(description="active, finished (every trial ended) or cancelled.")
    dataset: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    sampler: str
    pruner: str
    objective: dict[str, str]
    trials_total: int = Field(description="How many trials the study runs.")
    max_parallel: int = Field(description="Trials queued or running at once (clipped to GPUYARD_MAX_PARALLEL_TRIALS).")
    prune_on: list[str]
    counts: dict[str, int] = Field(description="Trials by state.")
    best: TrialOut | None = Field(description="The succeeded trial with the best objective so far.")
    trials: list[TrialOut] | None = Field(None, description="Every trial asked (GET /v1/studies/<id> only).")
    request: dict[str, Any] | None = Field(None, description="The study as submitted (GET /v1/studies/<id> only).")


class StudyListOut(BaseModel):
    studies: list[StudyOut]


class StudyDryRunOut(BaseModel):
    trials: int = Field(description="How many trials the study would run.")
    max_parallel: int
    checked: int = Field(description="How many trial specs were checked: every grid point, or the space's corners.")
    largest: dict[str, Any] | None = Field(
        description="The largest checked trial: its params, parameters and estimated training bytes."
    )
    first: list[PlacementOut] = Field(description="Where the first max_parallel trials would start if submitted now.")
