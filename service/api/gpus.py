"""/v1/gpus: every registered GPU with its state, live readings and jobs; admins drain and clear them."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from core.states import RUNNING
from models.spec import resources_of
from service.api import respond
from service.auth import authenticate, current_user
from service.errors import Forbidden, NotFound
from service.extensions import services
from service.schemas import GpuJobOut, GpuListOut, GpuOut, GpuProcessOut
from worker.db import Job
from worker.dispatch import GpuView, dispatch, gpu_views
from worker.gpus import budget_bytes, context_allowance_bytes

bp = Blueprint("gpus", __name__, url_prefix="/v1/gpus")
bp.before_request(authenticate)


@bp.get("")
def index() -> Response:
    """Every registered GPU: state (online, offline, draining, quarantined), memory, utilization, the
    jobs on it with their fraction and measured memory, and processes gpuyard did not start.

    A non-admin sees other users' jobs only as usage (fraction, budget, memory): id and owner are null.
    """
    svc = services()
    return respond(GpuListOut(gpus=[_gpu_out(view) for view in gpu_views(svc.db, svc.heartbeats)]))


@bp.post("/<uuid>/drain")
def drain(uuid: str) -> Response:
    """Drain a GPU: its running jobs finish, no new job is placed on it (admin)."""
    _admin_only()
    services().db.set_gpu_draining(_known(uuid), True, by=current_user().name)
    return respond(_view(uuid))


@bp.post("/<uuid>/undrain")
def undrain(uuid: str) -> Response:
    """Let a drained GPU take jobs again (admin)."""
    _admin_only()
    services().db.set_gpu_draining(_known(uuid), False)
    _dispatch_now()
    return respond(_view(uuid))


@bp.post("/<uuid>/clear")
def clear(uuid: str) -> Response:
    """Clear a GPU's quarantine after checking it (nvidia-smi shows no stray process or memory) (admin)."""
    _admin_only()
    services().db.clear_gpu_quarantine(_known(uuid))
    _dispatch_now()
    return respond(_view(uuid))


def _admin_only() -> None:
    if not current_user().is_admin:
        raise Forbidden("only an admin may drain, undrain or clear a GPU")


def _known(uuid: str) -> str:
    if services().db.get_gpu(uuid) is None:
        raise NotFound(f"no registered GPU {uuid!r}; GET /v1/gpus lists them")
    return uuid


def _view(uuid: str) -> GpuOut:
    svc = services()
    for view in gpu_views(svc.db, svc.heartbeats):
        if view.uuid == uuid:
            return _gpu_out(view)
    raise NotFound(f"no registered GPU {uuid!r}")


def _dispatch_now() -> None:
    """The GPU may take jobs again: place waiting ones now rather than at the next janitor pass."""
    svc = services()
    dispatch(svc.db, svc.settings, gpu_views(svc.db, svc.heartbeats), svc.send)


def _gpu_out(view: GpuView) -> GpuOut:
    """The GPU as the caller may see it: another user's jobs only as anonymous usage, unless an admin asks."""
    svc = services()
    viewer = current_user()
    allowance = context_allowance_bytes(svc.settings)
    ours = [p for p in view.processes if p.get("gpuyard")]
    jobs = []
    committed = 0.0
    for job in svc.db.jobs_on_gpu(view.uuid):
        fraction = resources_of(job.spec).memory_fraction
        committed += fraction
        visible = viewer.is_admin or job.owner_id == viewer.id
        jobs.append(
            GpuJobOut(
                id=job.id if visible else None,
                owner=job.owner.name if visible else None,
                state=job.state,  # type: ignore[arg-type]
                memory_fraction=fraction,
                budget_bytes=budget_bytes(fraction, view.memory_total_bytes, allowance),
                memory_bytes=_job_memory(job, ours),
            )
        )
    row = view.row
    return GpuOut(
        uuid=view.uuid,
        host=view.host,
        index=view.index,
        name=view.name,
        state=view.state,  # type: ignore[arg-type]
        online=view.online,
        slots=view.slots,
        memory_total_bytes=view.memory_total_bytes,
        memory_used_bytes=view.memory_used_bytes,
        utilization_percent=view.utilization_percent,
        fraction_committed=round(committed, 6),
        jobs=jobs,
        foreign_processes=[
            GpuProcessOut(pid=p["pid"], memory_bytes=p["memory_bytes"]) for p in view.processes if not p.get("gpuyard")
        ],
        draining_since=row.draining_since if row else None,
        quarantined_since=row.quarantined_since if row else None,
        quarantine_reason=row.quarantine_reason if row else None,
        heartbeat_at=view.heartbeat_at,
    )


def _job_memory(job: Job, ours: list[dict[str, Any]]) -> int | None:
    """The job's memory now: the heartbeat's gpuyard processes in its trainer's process group."""
    pgid = (job.last_progress or {}).get("trainer_pid")
    if pgid is None or job.state != RUNNING:
        return None
    return sum(p["memory_bytes"] for p in ours if p.get("pgid") == pgid)
