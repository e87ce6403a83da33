"""The GPU board: memory split by job and foreign process, utilisation, state; admins drain and undrain."""

from __future__ import annotations

from flask import redirect, render_template, url_for
from werkzeug.wrappers import Response

from service.gpus import drain_gpu, gpu_board, undrain_gpu
from service.ui.base import bp, ui_user


@bp.get("/gpus")
def gpus() -> str:
    return render_template("ui/gpus.html", gpus=gpu_board(ui_user()))


@bp.get("/gpus/board")
def gpu_cards() -> str:
    """The GPU cards alone: what the page polls every 3 s."""
    return render_template("ui/_gpu_cards.html", gpus=gpu_board(ui_user()))


@bp.post("/gpus/<uuid>/drain")
def drain(uuid: str) -> Response:
    drain_gpu(ui_user(), uuid)
    return redirect(url_for("ui.gpus"))


@bp.post("/gpus/<uuid>/undrain")
def undrain(uuid: str) -> Response:
    undrain_gpu(ui_user(), uuid)
    return redirect(url_for("ui.gpus"))
