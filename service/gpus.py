"""The GPU board as the API and the dashboard show it, and the admin's drain/undrain/clear actions."""

from __future__ import annotations

from typing import Any

from core.states import RUNNING
from models.spec import resources_of
from service.errors import Forbidden, NotFound
from service.extensions import services
from service.schemas import GpuJobOut, GpuOut, GpuProcessOut
from store import Job, User
from worker.dispatch import dispatch
from worker.gpus import budget_bytes, context_allowance_bytes
from worker.placement import GpuView, gpu_views


def gpu_board(viewer: User) -> list[GpuOut]:
    """Every registered GPU: state, memory, utilization, its jobs and the processes gpuyard did not start;
    as ``viewer`` may see them (another user's jobs only as anonymous usage, unless an admin asks)."""
    svc = services()
    return [gpu_out(view, viewer) for view in gpu_views(svc.db, svc.heartbeats)]


def gpu_board_entry(uuid: str, viewer: User) -> GpuOut:
    """One registered GPU as :func:`gpu_board` shows it to ``viewer``.

    Raises:
        NotFound: no registered GPU has this uuid.
    """
    svc = services()
    for view in gpu_views(svc.db, svc.heartbeats):
        if view.uuid == uuid:
            return gpu_out(view, viewer)
    raise NotFound(f"no registered GPU {uuid!r}; GET /v1/gpus lists them")


def drain_gpu(user: User, uuid: str) -> GpuOut:
    """Drain a GPU: its running jobs finish, no new job is placed on it (admin only)."""
    _admin_only(user)
    services().db.set_gpu_draining(_known(uuid), True, by=user.name)
    return gpu_board_entry(uuid, user)


def undrain_gpu(user: User, uuid: str) -> GpuOut:
    """Let a drained GPU take jobs again, placing waiting ones at once (admin only)."""
    _admin_only(user)
    services().db.set_gpu_draining(_known(uuid), False)
    _dispatch_now()
    return gpu_board_entry(uuid, user)


def clear_gpu(user: User, uuid: str) -> GpuOut:
    """Clear a GPU's quarantine (admin only)."""
    _admin_only(user)
    services().db.clear_gpu_quarantine(_known(uuid))
    _dispatch_now()
    return gpu_board_entry(uuid, user)


def _admin_only(user: User) -> None:
    if not user.is_admin:
        raise Forbidden("only an admin may drain, undrain or clear a GPU")


def _known(uuid: str) -> str:
    if services().db.get_gpu(uuid) is None:
        raise NotFound(f"no registered GPU {uuid!r}; GET /v1/gpus lists them")
    return uuid


def _dispatch_now() -> None:
    """The GPU may take jobs again: place waiting ones now rather than at the next janitor pass."""
    svc = services()
    dispatch(svc.db, svc.settings, gpu_views(svc.db, svc.heartbeats), svc.send)


def gpu_out(view: GpuView, viewer: User) -> GpuOut:
    """A GPU's view (registry row + heartbeat) with its jobs' fractions, budgets and measured memory. A
    non-admin ``viewer`` sees other users' jobs only as usage (fraction, budget, memory): id and owner null."""
    svc = services()
    allowance = context_allowance_bytes(svc.settings)
    ours = [p for p in view.processes if p.get("gpuyard")]
    jobs = []
    committed = 0.0
    for job in svc.db.jobs_on_gpu(view.uuid):
        fraction = resources_of(job.spec).fraction
        committed += fraction
        visible = viewer.is_admin or job.owner_id == viewer.id
        jobs.append(
            GpuJobOut(
                id=job.id if visible else None,
                owner=job.owner.name if visible else None,
                state=job.state,
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
        state=view.state,
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
