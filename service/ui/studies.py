"""Study pages: the list, and one study with its trials table (sortable), best-so-far chart and pruned trials."""

from __future__ import annotations

from typing import Any

from flask import render_template

from core.states import PRUNED, SUCCEEDED
from service.errors import NotFound
from service.extensions import services
from service.ui.base import bp, ui_owner_id
from worker.trials import StudyView, param_importances, study_view


@bp.get("/studies")
def studies() -> str:
    """Every study of the user (an admin's: everyone's) with its trial counts and best value."""
    db = services().db
    views = [study_view(db, row) for row in db.list_studies(ui_owner_id())]
    return render_template("ui/studies.html", studies=views)


@bp.get("/studies/<study_id>")
def study(study_id: str) -> str:
    """One study: its trials (params, state, objective, reason, job), best-so-far against trial number."""
    db = services().db
    row = db.get_study(study_id, ui_owner_id())
    if row is None:
        raise NotFound(f"no study {study_id!r}")
    view = study_view(db, row)
    return render_template(
        "ui/study.html",
        view=view,
        paths=[d.path for d in view.request.dimensions()],
        chart=_chart(view),
        importances=param_importances(db, row),
    )


def _chart(view: StudyView) -> dict[str, Any]:
    """The chart's data: each trial's value and the best so far, by trial number (pruned ones marked)."""
    maximize = view.request.objective.direction == "maximize"
    numbers, values, best_so_far, pruned = [], [], [], []
    best: float | None = None
    for trial in sorted(view.trials, key=lambda t: t.number):
        numbers.append(trial.number)
        values.append(trial.value)
        if trial.value is not None and trial.state == SUCCEEDED:
            best = trial.value if best is None else (max(best, trial.value) if maximize else min(best, trial.value))
        best_so_far.append(best)
        pruned.append(trial.value if trial.state == PRUNED else None)
    return {
        "metric": view.request.objective.metric,
        "number": numbers,
        "value": values,
        "best": best_so_far,
        "pruned": pruned,
    }
