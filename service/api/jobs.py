"""/v1/jobs: submit (or dry-run), list, show, cancel jobs; stream their events; fetch logs and artifacts."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from flask import Blueprint, Response, request, send_file, url_for

from core.atomicio import file_sha256
from core.names import ARTIFACT_MEDIA_TYPES, ARTIFACT_NAMES, TRAINER_LOG
from core.states import TERMINAL_STATES
from models.spec import parse_spec
from service.api import json_body, query_args, respond
from service.api.declare import TEXT, documented, query_param
from service.auth import authenticate, current_principal, current_user, visible_owner_id
from service.errors import NotFound, TooManyRequests, Unprocessable, scrub_paths, server_roots
from service.extensions import services
from service.principal import acting_user
from service.schemas import DryRunOut, JobCreate, JobListOut, JobListQuery, JobOut, PlacementOut
from service.streams import EventHub, StreamedEvent
from store import Database, Job
from worker.notify import url_problems
from worker.placement import gpu_views
from worker.submit import check_submission, dry_run_report, submit_job, would_start

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")


@bp.post("")
@documented(
    "submitJob",
    summary="Queue a job; with ?dry_run=1 report what it would build and queue nothing",
    body=JobCreate,
    params=(query_param("dry_run", {"type": "boolean"}, "Check and build only; queue nothing"),),
    responses={201: (JobOut, "Queued"), 200: (DryRunOut, "Dry run")},
    errors=(400, 401, 404, 422, 429, 503),
)
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
    submission = check_submission(
        svc.db,
        svc.settings,
        user=current_user(),
        dataset=dataset,
        spec=spec,
        priority=body.priority,
        gpus=gpu_views(svc.db, svc.heartbeats),
        storage=svc.storage,
        check_dataset=svc.check_dataset,
    )
    if dry_run:
        result = dry_run_report(submission, svc.storage, svc.dry_run)
        placement = would_start(svc.db, svc.settings, submission)
        return respond(
            DryRunOut(
                dataset=dataset.id,
                spec=submission.spec,
                report=result.get("report"),
                env=result.get("env"),
                placement=PlacementOut(**dataclasses.asdict(placement)),
                memory=submission.sized.detail if submission.sized else None,
            )
        )
    job = submit_job(svc.db, svc.settings, submission, notify=body.notify, send=svc.send, wake=svc.wake)
    return respond(job_out(job), 201, {"Location": url_for("jobs.show", job_id=job.id)})


@bp.get("")
@documented(
    "listJobs", summary="Your jobs, newest first", query=JobListQuery, responses={200: JobListOut}, errors=(401, 422)
)
def index() -> Response:
    """The caller's jobs (an admin's: everyone's), newest first; ``?state=``, ``?limit=``, ``?cursor=``."""
    query = query_args(JobListQuery)
    try:
        page = services().db.list_jobs(visible_owner_id(), state=query.state, limit=query.limit, cursor=query.cursor)
    except ValueError as exc:
        raise Unprocessable(str(exc), field="cursor") from exc
    jobs = [job_out(j) for j in page.jobs]
    return conditional(respond(JobListOut(jobs=jobs, next_cursor=page.next_cursor)))


@bp.get("/<job_id>")
@documented("getJob", summary="One job", responses={200: JobOut}, errors=(401, 404))
def show(job_id: str) -> Response:
    """One job: state, attempts, progress, error; while it waits for a GPU, its place in the queue.

    The answer carries an ``ETag``; a poller that sends it back in ``If-None-Match`` gets ``304 Not
    Modified`` with no body while the job is unchanged.
    """
    job = services().db.read_job(job_id, visible_owner_id())
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return conditional(respond(job_out(job)))


def conditional(response: Response) -> Response:
    """``response`` with a strong ``ETag`` (SHA-1 of the body), or ``304 Not Modified`` when the request's
    ``If-None-Match`` names it: the body is what the client already has, so any change to the job shows."""
    response.add_etag()
    response.make_conditional(request)  # turns it into the 304 in place when If-None-Match names the ETag
    return response


def job_out(job: Job) -> JobOut:
    """The job as the API shows it: no server path in its error."""
    svc = services()
    out = JobOut.of(job)
    if out.error_detail:
        out.error_detail = scrub_paths(out.error_detail, server_roots(svc.settings))
    return out


@bp.post("/<job_id>/cancel")
@documented("cancelJob", summary="Cancel a job", responses={200: JobOut}, errors=(401, 404))
def cancel(job_id: str) -> Response:
    """Cancel a job: a queued one at once; a running one is stopped by its worker; a finished one stays."""
    visible_job(job_id)
    job = services().db.request_cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return respond(job_out(job))


@bp.get("/<job_id>/events")
@documented(
    "jobEvents",
    summary="Server-Sent Events, replayed then live; `id:` is the sequence number, resume with Last-Event-ID",
    params=(
        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer"}},
        query_param("last_event_id", {"type": "integer"}, "Same as the Last-Event-ID header"),
    ),
    responses={
        200: {
            "description": "text/event-stream; each `data:` is a JobEventOut.event object",
            "content": {"text/event-stream": TEXT},
        }
    },
    errors=(401, 404, 422, 429),
)
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
    settings = svc.settings
    user_id, principal = current_user().id, current_principal()
    slot = svc.stream_slots.acquire(user_id)
    if slot is None:
        cap = svc.settings.max_streams_per_user
        raise TooManyRequests(
            f"you have {cap} event streams open; the limit is {cap} (max_streams_per_user). Close one, or retry later",
            code="too_many_streams",
            headers={"Retry-After": str(max(1, round(svc.settings.sse_keepalive_s)))},
        )
    stream = _EventStream(
        _event_stream(
            svc.db,
            svc.hub,
            job_id,
            after,
            _StreamPacing(settings.sse_keepalive_s, settings.sse_batch_interval_s, settings.principal_recheck_s),
            server_roots(settings),
            may_act=lambda: acting_user(svc.db, principal) is not None,
        ),
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


@dataclass(frozen=True)
class _StreamPacing:
    """How an event stream paces itself: keep-alives, batch coalescing, and re-checking its principal."""

    keepalive_s: float
    batch_interval_s: float
    recheck_s: float


def _event_stream(
    db: Database,
    hub: EventHub,
    job_id: str,
    after: int,
    pacing: _StreamPacing,
    roots: list[str],
    may_act: Callable[[], bool],
) -> Iterator[str]:
    """The SSE body. Takes its parts as arguments: the generator runs after the request context is gone.

    Every ``pacing.recheck_s`` it asks ``may_act`` whether its principal may still act (the user was not
    disabled and their token not rotated meanwhile) and ends when not. It reads the DB at most once per
    ``pacing.batch_interval_s`` and sends only the latest of the batch events read at once (the others are
    progress already superseded); every other event is sent.
    """
    last = after
    yield "retry: 2000\n\n"
    with hub.watch(job_id) as published:
        quiet_since = checked_at = time.monotonic()
        read_at = 0.0
        while True:
            now = time.monotonic()
            if now - checked_at >= pacing.recheck_s:
                if not may_act():
                    return
                checked_at = now
            if now - read_at < pacing.batch_interval_s:
                time.sleep(pacing.batch_interval_s - (now - read_at))
            read_at = time.monotonic()
            published.clear()  # before reading: an event stored after this read wakes the wait below
            published_run = hub.recent_after(job_id, last)
            batch: Sequence[StreamedEvent] = published_run or db.events_since(job_id, last)
            for job_event in _coalesce_batches(batch):
                yield _sse(job_event, roots)
                if _is_terminal(job_event):
                    return
            if batch:
                last = batch[-1].seq
                quiet_since = time.monotonic()
                if not published_run:
                    continue  # read from the DB: it may hold more (a long history comes in pages)
                # From the hub: straight to the wait, since anything published after the clear above set the
                # flag; a busy job's streams read no DB at all.
            else:
                job = db.get_job(job_id)
                if job is None:
                    return
                if job.is_terminal:
                    # Ended without a terminal event after ours (or a resume past it): flush what is left, stop.
                    for job_event in db.events_since(job_id, last):
                        yield _sse(job_event, roots)
                    return
            quiet = time.monotonic() - quiet_since
            if quiet >= pacing.keepalive_s:
                quiet_since = time.monotonic()
                yield _KEEPALIVE
                continue
            until_check = pacing.recheck_s - (time.monotonic() - checked_at)
            hub.wait(published, max(0.0, min(pacing.keepalive_s - quiet, until_check)))


def _coalesce_batches(batch: Sequence[StreamedEvent]) -> list[StreamedEvent]:
    """The events of one read with each run of ``batch`` progress events cut to its last (order kept): a
    client still sees an epoch's last progress before its ``epoch_end``, not every batch of a burst."""

    def is_batch(i: int) -> bool:
        return batch[i].event.get("event") == "batch"

    return [e for i, e in enumerate(batch) if not (is_batch(i) and i + 1 < len(batch) and is_batch(i + 1))]


def _sse(job_event: StreamedEvent, roots: list[str]) -> str:
    """One event as SSE; server paths in it (a trainer's detail, its artifact paths) cut to file names."""
    name = str(job_event.event.get("event", "message")).replace("\n", " ")
    data = _scrubbed(json.dumps(job_event.event, separators=(",", ":")), tuple(roots))
    return f"id: {job_event.seq}\nevent: {name}\ndata: {data}\n\n"


@lru_cache(maxsize=4096)
def _scrubbed(data: str, roots: tuple[str, ...]) -> str:
    """:func:`scrub_paths`, once per event text in this process: every stream of a job sends the same events."""
    return scrub_paths(data, roots)


def _is_terminal(job_event: StreamedEvent) -> bool:
    return job_event.event.get("event") == "state" and job_event.event.get("state") in TERMINAL_STATES


def _last_event_id() -> int:
    """Where the stream resumes: the ``Last-Event-ID`` header, else ``?last_event_id=``; each one sent must be
    a sequence number (a bad query value is refused even when the header wins)."""
    sent = {
        "Last-Event-ID": request.headers.get("Last-Event-ID"),
        "last_event_id": request.args.get("last_event_id"),
    }
    for name, raw in sent.items():
        if raw is not None and not re.fullmatch(r"[0-9]{1,18}", raw.strip()):
            raise Unprocessable(
                f"Expected {name} to be an event sequence number (0 or more). Received: {raw!r}",
                field="last_event_id",
            )
    raw = sent["Last-Event-ID"] or sent["last_event_id"] or "0"
    return int(raw)


@bp.get("/<job_id>/logs")
@documented(
    "jobLogs",
    summary="The trainer's log (stderr); supports Range",
    responses={200: {"description": "Log text", "content": {"text/plain": TEXT}}},
    errors=(401, 404),
)
def logs(job_id: str) -> Response:
    """The trainer's log (its stderr) as text; Range requests let a client follow its tail."""
    job = visible_job(job_id)
    storage = services().storage
    key = storage.job_key(job.id, TRAINER_LOG)
    if not storage.exists(key):
        raise NotFound(f"job {job_id} has no log yet (state: {job.state})")
    return send_file(storage.local_path(key), mimetype="text/plain; charset=utf-8", conditional=True, max_age=0)


@bp.get("/<job_id>/artifacts/<name>")
@documented(
    "jobArtifact",
    summary="Download an artifact; ETag is its SHA-256; supports If-None-Match and Range",
    path={"name": {"enum": list(ARTIFACT_NAMES)}},
    responses={
        200: {
            "description": "The file: "
            + ", ".join(f"{name} as {media}" for name, media in ARTIFACT_MEDIA_TYPES.items()),
            "content": {media: {"schema": {}} for media in sorted(set(ARTIFACT_MEDIA_TYPES.values()))},
        },
        206: {"description": "Partial content (Range)"},
        304: {"description": "Not modified (If-None-Match)"},
    },
    errors=(401, 404),
)
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
