"""Job pages: the list (waiting, running, finished), one job with its curves and gradient flow, compare."""

from __future__ import annotations

import json
from typing import Any

from flask import redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from core.names import ARTIFACT_NAMES, DIAGNOSTICS, HISTORY, TRAINER_LOG
from core.states import JOB_STATES, QUEUED, RUNNING
from models.data.summary import DatasetSummary
from models.spec import resources_of
from service.api.jobs import job_out
from service.errors import NotFound, Unprocessable
from service.extensions import services
from service.schemas import JobOut
from service.ui.base import bp, ui_owner_id
from store import Job
from worker.gpus import budget_bytes, context_allowance_bytes

JOBS_SHOWN = 200
LOG_TAIL_BYTES = 16 * 1024
LOG_TAIL_LINES = 60
MIN_COMPARED, MAX_COMPARED = 2, 8


@bp.get("/jobs")
def jobs() -> str:
    """Waiting jobs (queue position, why they wait), running ones (live progress), finished ones."""
    return render_template("ui/jobs.html", state=_state_filter(), **_job_groups())


@bp.get("/jobs/rows")
def job_rows() -> str:
    """The job tables alone: what the list page polls every 2 s."""
    return render_template("ui/_job_tables.html", state=_state_filter(), **_job_groups())


def _state_filter() -> str | None:
    state = request.args.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise Unprocessable(
            f"Expected state to be one of {', '.join(JOB_STATES)}. Received: state={state!r}", field="state"
        )
    return state


def _job_groups() -> dict[str, list[JobOut]]:
    db = services().db
    page = db.list_jobs(ui_owner_id(), state=_state_filter(), limit=JOBS_SHOWN)
    waiting, running, finished = [], [], []
    for job in page.jobs:
        if job.state == QUEUED:
            waiting.append(job_out(job))
        elif job.state == RUNNING:
            running.append(job_out(job))
        else:
            finished.append(job_out(job))
    waiting.sort(key=lambda j: j.queue_position or 1 << 30)
    return {"waiting": waiting, RUNNING: running, "finished": finished}  # RUNNING names the template variable


def _visible(job_id: str) -> Job:
    job = services().db.get_job(job_id, ui_owner_id())
    if job is None:
        raise NotFound(f"no job {job_id!r} (or not yours)")
    return job


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    """One job: live curves, gradient flow, spec, data set, GPU and memory, artifacts, log tail."""
    found = _visible(job_id)
    svc = services()
    dataset = svc.db.get_dataset(found.dataset_id) if found.dataset_id else None
    summary = DatasetSummary.model_validate(dataset.summary) if dataset else None
    return render_template(
        "ui/job.html",
        job=job_out(found),
        dataset=dataset,
        summary=summary,
        memory=_memory(found),
        artifacts=_artifacts(found),
        log_tail=_log_tail(found),
        spec_json=json.dumps(found.spec, indent=2),
    )


@bp.get("/jobs/<job_id>/status")
def job_status(job_id: str) -> str:
    """The job's state, progress and timings alone: what its page polls while it is active."""
    found = _visible(job_id)
    return render_template(
        "ui/_job_status.html", job=job_out(found), memory=_memory(found), artifacts=_artifacts(found)
    )


@bp.get("/jobs/<job_id>/log")
def job_log(job_id: str) -> str:
    """The trainer log's last lines, escaped."""
    found = _visible(job_id)
    return render_template("ui/_log_tail.html", job=JobOut.of(found), log_tail=_log_tail(found))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    """Cancel, as POST /v1/jobs/<id>/cancel does: a queued job at once, a running one by its worker."""
    _visible(job_id)
    services().db.request_cancel(job_id)
    target = request.form.get("back") == "list"
    return redirect(url_for("ui.jobs") if target else url_for("ui.job", job_id=job_id))


def _memory(job: Job) -> dict[str, Any]:
    """GPU, memory fraction, budget (fraction × total + context allowance) and measured peak."""
    svc = services()
    fraction = resources_of(job.spec).fraction
    gpu = svc.db.get_gpu(job.gpu) if job.gpu and job.gpu != "cpu" else None
    budget = None
    if gpu is not None:
        allowance = context_allowance_bytes(svc.settings)
        budget = budget_bytes(fraction, gpu.memory_total_bytes, allowance)
    return {
        "gpu": job.gpu,
        "gpu_name": f"{gpu.name} (index {gpu.index} on {gpu.host})" if gpu else None,
        "fraction": fraction,
        "budget_bytes": budget,
        "peak_bytes": job.peak_gpu_memory_bytes,
    }


def _artifacts(job: Job) -> list[str]:
    storage = services().storage
    return [name for name in ARTIFACT_NAMES if storage.exists(storage.job_key(job.id, name))]


def _log_tail(job: Job) -> str | None:
    storage = services().storage
    key = storage.job_key(job.id, TRAINER_LOG)
    if not storage.exists(key):
        return None
    with storage.local_path(key).open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - LOG_TAIL_BYTES))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


# ── compare ──
@bp.get("/compare")
def compare() -> str:
    """Two to eight jobs overlaid (loss, validation metric, gradient ratio) and their specs' differences."""
    ids = [part.strip() for raw in request.args.getlist("jobs") for part in raw.split(",") if part.strip()]
    ids = list(dict.fromkeys(ids))
    if not MIN_COMPARED <= len(ids) <= MAX_COMPARED:
        raise Unprocessable(
            f"Expected {MIN_COMPARED} to {MAX_COMPARED} job ids in ?jobs=ID,ID,... Received: {len(ids)} "
            f"({', '.join(ids) or 'none'})",
            field="jobs",
        )
    found = [_visible(job_id) for job_id in ids]
    series = [_series(job) for job in found]
    return render_template(
        "ui/compare.html",
        jobs=[JobOut.of(job) for job in found],
        series=series,
        differences=spec_differences([job.spec for job in found]),
    )


def _series(job: Job) -> dict[str, Any]:
    """A job's per-epoch curves (history.json, else its epoch_end events) and first/last gradient ratio."""
    storage = services().storage
    columns = _read_json(storage, job, HISTORY)
    diagnostics = _read_json(storage, job, DIAGNOSTICS)
    if not isinstance(columns, dict) or not isinstance(diagnostics, list):  # still training: its events
        event_columns, event_diagnostics = _from_events(job)
        columns = columns if isinstance(columns, dict) else event_columns
        diagnostics = diagnostics if isinstance(diagnostics, list) else event_diagnostics
    ratio_epochs, ratios = [], []
    if isinstance(diagnostics, list):
        first, last = _end_blocks(diagnostics)
        for record in diagnostics:
            blocks = record.get("blocks") or {}
            top, bottom = (blocks.get(first) or {}).get("gradient_norm"), (blocks.get(last) or {}).get("gradient_norm")
            if first != last and top and bottom:
                ratio_epochs.append(record.get("epoch"))
                ratios.append(top / bottom)
    return {
        "id": job.id,
        "label": f"{job.spec.get('name') or job.spec.get('architecture', {}).get('family', '')} ({job.id})",
        "state": job.state,
        "columns": columns,
        "ratio": {"epoch": ratio_epochs, "ratio": ratios},
    }


def _end_blocks(records: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """The first and the last block that has a gradient (an input or normalization block has none)."""
    names: list[str] = []
    for record in records:
        for name, entry in (record.get("blocks") or {}).items():
            if name not in names and (entry or {}).get("gradient_norm"):
                names.append(name)
    return (names[0], names[-1]) if names else (None, None)


def _read_json(storage: Any, job: Job, name: str) -> Any:
    key = storage.job_key(job.id, name)
    if not storage.exists(key):
        return None
    try:
        return json.loads(storage.local_path(key).read_text())
    except (OSError, ValueError):
        return None


def _from_events(job: Job) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The stored epoch_end events as history.json's columns, and the diagnostics events as its records
    (a job still running has neither file yet)."""
    db = services().db
    rows: list[dict[str, Any]] = []
    diagnostics: list[dict[str, Any]] = []
    after = 0
    while True:
        batch = db.events_since(job.id, after)
        if not batch:
            break
        after = batch[-1].seq
        for job_event in batch:
            event = job_event.event
            if event.get("event") == "epoch_end":
                rows.append({"epoch": event.get("epoch"), "loss": event.get("loss"), **(event.get("metrics") or {})})
            elif event.get("event") == "diagnostics":
                diagnostics.append({"epoch": event.get("epoch"), "blocks": event.get("blocks") or {}})
    columns: dict[str, list[Any]] = {"epoch": []}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            values.append(row.get(key))
    return columns, diagnostics


def spec_differences(specs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The dotted spec fields whose values differ between ``specs``, with each spec's value as text."""
    flat = [_flatten(spec) for spec in specs]
    keys = sorted(set().union(*flat))
    rows = []
    for key in keys:
        values = [json.dumps(f[key]) if key in f else "—" for f in flat]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
