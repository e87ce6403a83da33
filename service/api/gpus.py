"""/v1/gpus: every registered GPU with its state, live readings and jobs; admins drain and clear them."""

from __future__ import annotations

from flask import Blueprint, Response

from service.api import respond
from service.api.declare import documented
from service.auth import authenticate, current_user
from service.gpus import clear_gpu, drain_gpu, gpu_board, undrain_gpu
from service.schemas import GpuListOut, GpuOut

bp = Blueprint("gpus", __name__, url_prefix="/v1/gpus")
bp.before_request(authenticate)


@bp.get("")
@documented(
    "listGpus", summary="Every registered GPU: state, memory, jobs, foreign processes", responses={200: GpuListOut}
)
def index() -> Response:
    """Every registered GPU: state (online, offline, draining, quarantined), memory, utilization, the
    jobs on it with their fraction and measured memory, and processes gpuyard did not start."""
    return respond(GpuListOut(gpus=gpu_board(current_user())))


@bp.post("/<uuid>/drain")
@documented(
    "drainGpu",
    summary="Drain a GPU: running jobs finish, no new ones start (admin)",
    responses={200: GpuOut},
    errors=(401, 403, 404),
)
def drain(uuid: str) -> Response:
    """Drain a GPU: its running jobs finish, no new job is placed on it (admin)."""
    return respond(drain_gpu(current_user(), uuid))


@bp.post("/<uuid>/undrain")
@documented(
    "undrainGpu", summary="Let a drained GPU take jobs again (admin)", responses={200: GpuOut}, errors=(401, 403, 404)
)
def undrain(uuid: str) -> Response:
    """Let a drained GPU take jobs again (admin)."""
    return respond(undrain_gpu(current_user(), uuid))


@bp.post("/<uuid>/clear")
@documented("clearGpu", summary="Clear a GPU's quarantine (admin)", responses={200: GpuOut}, errors=(401, 403, 404))
def clear(uuid: str) -> Response:
    """Clear a GPU's quarantine after checking it (nvidia-smi shows no stray process or memory) (admin)."""
    return respond(clear_gpu(current_user(), uuid))
