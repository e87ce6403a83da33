"""/v1/jobs: submit (or dry-run), list, show, cancel jobs; stream their events; fetch logs and artifacts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response, request, send_file, url_for

from core.atomicio import file_sha256
from core.errors import Problem
from core.names import ARTIFACT_MEDIA_TYPES, ARTIFACT_NAMES, TRAINER_LOG
from core.states import QUEUED, TERMINAL_STATES
from models.data.summary import DatasetSummary
from models.fit import spec_data_problems
from models.size import size_problems
from models.spec import AUTO, JobSpec, parse_spec
from service.api import json_body, query_args, respond
from service.auth import authenticate, current_user, visible_owner_id
from service.errors import NotFound, ServiceUnavailable, TooManyRequests, Unprocessable, scrub_paths, server_roots
from service.extensions import services
from service.schemas import DryRunOut, JobCreate, JobListOut, JobListQuery, JobOut, PlacementOut
from service.streams import EventHub
from store import Database, Dataset, Job, JobEvent, utcnow
from worker.dispatch import GpuView, decide_queue, dispatch, gpu_views, never_fits
from worker.errors import QueueUnavailable
from worker.notify import url_problems
from worker.sizing import auto_budget

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")


@bp.post("")
def submit() -> Response:
    """Validate and queue a job (201), or with ``?dry_run=1`` report what it would build (200).

    422 lists every spec problem, and a job no registered GPU could ever hold (an unknown
    ``resources.gpu``, a ``memory_fraction`` above ``1 − gpu_reserve_fraction`` or the per-user cap);
    404 when the data set is not the caller's; 429 at the per-user cap of queued + running jobs; 503 when
    the queue is unreachable (the job is then marked interrupted).

    A queued job is dispatched at once when a GPU has room for it (worker/dispatch.py); otherwise it
    waits, and GET /v1/jobs/<id> shows its ``queue_position`` and ``dispatch_note``.
    """
    svc = services()
    dry_run = _flag("dry_run")
    body = json_body(JobCreate)
    spec = parse_spec(body.spec)  # SpecError: 422 with every problem
    if body.notify:
        problems = url_problems(body.notify, svc.settings)
        if problems:
            raise Unprocessable.from_problems("notify_invalid", problems)
    dataset = svc.db.get_dataset(body.dataset, visible_owner_id())
    if dataset is None:
        raise NotFound(f"no data set {body.dataset!r}; upload one with POST /v1/datasets", field="dataset")
    summary = _check_fits_dataset(spec, dataset)
    size = size_problems(spec, list(summary.input_shape), summary.output_dim, svc.settings)
    if size:  # before anything is built, dry run included
        raise Unprocessable.from_problems("model_too_large", size, prefix="spec.")
    user = current_user()
    if body.priority > user.max_priority:
        raise Unprocessable(
            f"priority {body.priority} is above your max_priority {user.max_priority}; ask an admin "
            "(gpuyard users set-priority) or submit at most that",
            field="priority",
            code="priority_too_high",
        )
    if not spec.resources.preemptible and not user.may_pin:
        raise Unprocessable(
            "resources.preemptible false: you may not pin jobs against preemption; ask an admin "
            "(gpuyard users set-priority NAME N --may-pin) or leave it true",
            field="spec.resources.preemptible",
            code="pin_not_allowed",
        )
    spec_json = spec.model_dump(mode="json")
    if spec_json["resources"]["max_runtime_s"] is None and svc.settings.default_max_runtime_s:
        spec_json["resources"]["max_runtime_s"] = svc.settings.default_max_runtime_s
    gpus = gpu_views(svc.db, svc.heartbeats)
    _check_backend(spec, gpus)
    sized = None
    if spec.resources.memory_fraction == AUTO:
        sized = auto_budget(svc.db, svc.settings, spec, summary, gpus)
        spec_json["resources"]["memory_fraction"] = sized.memory_fraction
    never = never_fits(spec_json, gpus, svc.settings)
    if never:
        raise Unprocessable.from_problems("never_fits", never, prefix="spec.")
    if dry_run:
        data_path = svc.storage.local_path(dataset.storage_key)
        result = svc.dry_run(spec_json, data_path, summary)
        report = result.get("report") or {}
        if report.get("ok") is False:  # the model could not be built for this data: say every reason
            errors = report.get("errors") or [{"code": "dry_run_failed", "detail": "the dry run failed"}]
            problems = [Problem(e.get("code", "invalid"), e.get("detail", ""), e.get("field")) for e in errors]
            raise Unprocessable.from_problems("spec_invalid", problems, prefix="spec.")
        return respond(
            DryRunOut(
                dataset=dataset.id,
                spec=spec_json,
                report=result.get("report"),
                env=result.get("env"),
                placement=_would_start(spec_json, dataset.id, body.priority, gpus),
                memory=sized.detail if sized else None,
            )
        )
    job = svc.db.create_job(
        user.id,
        dataset.id,
        spec_json,
        max_active=svc.settings.max_active_jobs_per_user,
        max_attempts=svc.settings.max_attempts,
        priority=body.priority,
        memory_fraction_auto=sized is not None,
        notify=body.notify,
    )
    if sized is not None and sized.sized:
        svc.db.append_event(
            job.id, {"event": "memory_sized", "memory_fraction": sized.memory_fraction, "detail": sized.detail}
        )
    report = dispatch(svc.db, svc.settings, gpus, svc.send, wake=svc.wake)
    for placement, exc in report.failed:
        if placement.job_id == job.id:
            detail = str(exc) if isinstance(exc, QueueUnavailable) else f"{type(exc).__name__}: {exc}"
            svc.db.interrupt_queued(job.id, "queue_unavailable", detail)
            raise ServiceUnavailable(
                f"the job queue is unreachable ({detail}); the job was not started", code="queue_unavailable"
            ) from exc
    job = svc.db.get_job(job.id) or job
    return respond(job_out(job), 201, {"Location": url_for("jobs.show", job_id=job.id)})


def _check_backend(spec: JobSpec, gpus: list[GpuView]) -> None:
    """Refuse a backend no registered worker runs (422 listing those that exist); one that only offline
    workers run is accepted and waits (``no_worker_for_backend``). Unknown where no worker reported any."""
    backends = {b for g in gpus for b in (g.backends or (g.row.backends if g.row is not None else None) or ())}
    wanted = spec.resources.backend
    if spec.resources.gpu != "cpu" and backends and wanted not in backends:
        raise Unprocessable(
            f"resources.backend: no worker runs {wanted!r}; the workers run: {', '.join(sorted(backends))}",
            field="spec.resources.backend",
            code="no_worker_for_backend",
        )


def _would_start(spec_json: dict[str, Any], dataset_id: str, priority: int, gpus: list[GpuView]) -> PlacementOut:
    """Where and when a job like this would start if submitted now (a forecast; nothing is written)."""
    svc = services()
    now = utcnow()
    probe = Job(
        id="dry_run",
        owner_id=current_user().id,
        dataset_id=dataset_id,
        spec=spec_json,
        state=QUEUED,
        priority=priority,
        queued_at=now,
        attempts=0,
    )
    with svc.db.peek_queue() as txn:
        decided = decide_queue(txn, svc.settings, gpus, now, extra=probe)
    going = {p.job_id: p.gpu for p in decided.plan.placements}
    if probe.id in going:
        return PlacementOut(gpu=going[probe.id], estimated_start_at=now, waiting_reason=None, detail="would start now")
    position = [t.id for t in decided.order if t.id in decided.plan.notes].index(probe.id) + 1
    return PlacementOut(
        gpu=None,
        estimated_start_at=decided.starts.get(probe.id),
        waiting_reason=decided.plan.reasons.get(probe.id),
        detail=decided.plan.notes.get(probe.id),
        queue_position=position,
    )


@bp.get("")
def index() -> Response:
    """The caller's jobs (an admin's: everyone's), newest first; ``?state=``, ``?limit=``, ``?cursor=``."""
    query = query_args(JobListQuery)
    try:
        page = services().db.list_jobs(visible_owner_id(), state=query.state, limit=query.limit, cursor=query.cursor)
    except ValueError as exc:
        raise Unprocessable(str(exc), field="cursor") from exc
    jobs = [job_out(j) for j in page.jobs]
    return respond(JobListOut(jobs=jobs, next_cursor=page.next_cursor))


@bp.get("/<job_id>")
def show(job_id: str) -> Response:
    """One job: state, attempts, progress, error; while it waits for a GPU, its place in the queue."""
    return respond(job_out(visible_job(job_id)))


def job_out(job: Job) -> JobOut:
    """The job as the API shows it: no server path in its error."""
    svc = services()
    out = JobOut.of(job)
    if out.error_detail:
        out.error_detail = scrub_paths(out.error_detail, server_roots(svc.settings))
    return out


@bp.post("/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    """Cancel a job: a queued one at once; a running one is stopped by its worker; a finished one stays."""
    visible_job(job_id)
    job = services().db.request_cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return respond(job_out(job))


@bp.get("/<job_id>/events")
def events(job_id: str) -> Response:
    """Server-Sent Events: past events from the job DB, then new ones as they are stored.

    An open stream costs nothing while its job is quiet: it sleeps until the job's supervisor publishes
    an event (Redis pub/sub, one listener per API process: service/streams.py), then reads the new events
    from the job DB; without Redis it polls the DB every ``sse_poll_interval_s``. ``id:`` is the event's
    sequence number; a client resumes with ``Last-Event-ID`` (or ``?last_event_id=``). The stream ends
    after the job's terminal state event. A user holds at most ``max_streams_per_user`` streams (429 with
    ``Retry-After`` past that).
    """
    visible_job(job_id)
    after = _last_event_id()
    svc = services()
    user_id = current_user().id
    slot = svc.stream_slots.acquire(user_id)
    if slot is None:
        cap = svc.settings.max_streams_per_user
        raise TooManyRequests(
            f"you have {cap} event streams open; the limit is {cap} (max_streams_per_user). Close one, or retry later",
            code="too_many_streams",
            headers={"Retry-After": str(max(1, round(svc.settings.sse_keepalive_s)))},
        )
    stream = _EventStream(
        _event_stream(svc.db, svc.hub, job_id, after, svc.settings.sse_keepalive_s, server_roots(svc.settings)),
        on_close=lambda: svc.stream_slots.release(user_id, slot),
        on_keepalive=lambda: svc.stream_slots.refresh(user_id, slot),
    )
    return Response(
        stream,
        content_type="text/event-stream",  # as documented; SSE is UTF-8 by definition, no charset parameter
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _EventStream:
    """The response body: the event generator, plus the stream's slot given back on close (the WSGI
    server calls ``close`` even when the client left before the first event)."""

    def __init__(self, events: Iterator[str], on_close: Callable[[], None], on_keepalive: Callable[[], None]) -> None:
        self._events, self._on_close, self._on_keepalive = events, on_close, on_keepalive
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        for chunk in self._events:
            if chunk == _KEEPALIVE:
                self._on_keepalive()
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close_generator = getattr(self._events, "close", None)
            if close_generator is not None:
                close_generator()
            self._on_close()


_KEEPALIVE = ": keep-alive\n\n"


def _event_stream(
    db: Database, hub: EventHub, job_id: str, after: int, keepalive_s: float, roots: list[str]
) -> Iterator[str]:
    """The SSE body. Takes its parts as arguments: the generator runs after the request context is gone."""
    last = after
    yield "retry: 2000\n\n"
    with hub.watch(job_id) as published:
        quiet_since = time.monotonic()
        while True:
            published.clear()  # before reading: an event stored after this read wakes the wait below
            batch = db.events_since(job_id, last)
            for job_event in batch:
                last = job_event.seq
                yield _sse(job_event, roots)
                if _is_terminal(job_event):
                    return
            if batch:
                quiet_since = time.monotonic()
                continue
            job = db.get_job(job_id)
            if job is None:
                return
            if job.is_terminal:
                # Ended without a terminal event after ours (or a resume past it): flush what is left, stop.
                for job_event in db.events_since(job_id, last):
                    yield _sse(job_event, roots)
                return
            quiet = time.monotonic() - quiet_since
            if quiet >= keepalive_s:
                quiet_since = time.monotonic()
                yield _KEEPALIVE
                continue
            hub.wait(published, keepalive_s - quiet)


def _sse(job_event: JobEvent, roots: list[str]) -> str:
    """One event as SSE; server paths in it (a trainer's detail, its artifact paths) cut to file names."""
    name = str(job_event.event.get("event", "message")).replace("\n", " ")
    data = scrub_paths(json.dumps(job_event.event, separators=(",", ":")), roots)
    return f"id: {job_event.seq}\nevent: {name}\ndata: {data}\n\n"


def _is_terminal(job_event: JobEvent) -> bool:
    return job_event.event.get("event") == "state" and job_event.event.get("state") in TERMINAL_STATES


def _check_fits_dataset(spec: JobSpec, dataset: Dataset) -> DatasetSummary:
    """Refuse (422, every reason) a spec that cannot fit its data set, before a worker finds out.

    The stored summary was checked with the keys given at upload; a spec naming other keys (or declaring
    classes) has the file checked again, in the sandbox, with its own.
    """
    svc = services()
    summary = DatasetSummary.model_validate(dataset.summary)
    if spec.data != summary.keys:
        path = svc.storage.local_path(dataset.storage_key)
        summary = svc.check_dataset(path, spec.data, dataset.sha256)  # DataError: 422
    problems = spec_data_problems(spec, summary)
    if problems:
        raise Unprocessable.from_problems("spec_invalid", problems, prefix="spec.")
    return summary


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not re.fullmatch(r"[0-9]{1,18}", raw.strip()):
        raise Unprocessable(
            f"Expected Last-Event-ID (or ?last_event_id=) to be an event sequence number. Received: {raw!r}",
            field="last_event_id",
        )
    return int(raw)


@bp.get("/<job_id>/logs")
def logs(job_id: str) -> Response:
    """The trainer's log (its stderr) as text; Range requests let a client follow its tail."""
    job = visible_job(job_id)
    storage = services().storage
    key = storage.job_key(job.id, TRAINER_LOG)
    if not storage.exists(key):
        raise NotFound(f"job {job_id} has no log yet (state: {job.state})")
    return send_file(storage.local_path(key), mimetype="text/plain; charset=utf-8", conditional=True, max_age=0)


@bp.get("/<job_id>/artifacts/<name>")
def artifact(job_id: str, name: str) -> Response:
    """Download one artifact (model.h5, model.keras, history.json, diagnostics.json, summary.json).

    The ETag is the file's SHA-256; ``If-None-Match`` answers 304 and ``Range`` 206.
    """
    job = visible_job(job_id)
    if name not in ARTIFACT_NAMES:
        raise NotFound(f"Expected an artifact among {', '.join(ARTIFACT_NAMES)}. Received: {name!r}")
    storage = services().storage
    key = storage.job_key(job.id, name)
    if not storage.exists(key):
        raise NotFound(f"job {job_id} has no {name} (state: {job.state})")
    path = storage.local_path(key)
    stat = path.stat()
    return send_file(
        path,
        mimetype=ARTIFACT_MEDIA_TYPES[name],
        conditional=True,
        etag=_sha256_of(str(path), stat.st_mtime_ns, stat.st_size),
        download_name=name,
        as_attachment=True,
        max_age=0,
    )


@lru_cache(maxsize=256)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file; cached per (path, mtime, size), since artifacts are replaced, never edited."""
    return file_sha256(path)


def visible_job(job_id: str) -> Job:
    """The caller's job (an admin's: anyone's); 404 otherwise, as if it did not exist."""
    job = services().db.get_job(job_id, visible_owner_id())
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def _flag(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise Unprocessable(f"Expected ?{name}=1 or ?{name}=0. Received: {name}={raw!r}", field=name)
