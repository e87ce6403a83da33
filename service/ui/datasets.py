"""Data sets (upload from the browser, list, delete) and the submit page (spec, dry run, queue)."""

from __future__ import annotations

import json
from pathlib import Path

from flask import redirect, render_template, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response

from models.spec import JobSpec
from service.api.datasets import delete_dataset
from service.extensions import services
from service.schemas import DatasetOut
from service.ui.base import bp, ui_owner_id

EXAMPLE_SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"


@bp.get("/datasets")
def datasets() -> str:
    """The upload form (streamed to POST /v1/datasets, with progress) and the caller's data sets."""
    rows = [DatasetOut.of(d) for d in services().db.list_datasets(ui_owner_id())]
    return render_template("ui/datasets.html", datasets=rows, max_upload_bytes=services().settings.max_upload_bytes)


@bp.post("/datasets/<dataset_id>/delete")
def delete(dataset_id: str) -> Response:
    """Delete, as DELETE /v1/datasets/<id> does (409 while a queued or running job uses it)."""
    delete_dataset(dataset_id, ui_owner_id())
    return redirect(url_for("ui.datasets"))


@bp.get("/submit")
def submit() -> str:
    """Choose a data set, build the spec in a form generated from its JSON Schema (or as JSON, or from an
    example), dry-run it as it changes, then queue it."""
    rows = [DatasetOut.of(d) for d in services().db.list_datasets(ui_owner_id())]
    return render_template(
        "ui/submit.html", datasets=rows, examples=example_specs(), spec_schema=_script_json(JobSpec.model_json_schema())
    )


def _script_json(value: object) -> Markup:
    """JSON for a <script type="application/json"> element, in the spec's own field order (Jinja's
    ``tojson`` sorts keys, and the form shows fields in the order the spec declares them)."""
    text = json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)  # escaped above: nothing in it can close the script element


def example_specs() -> dict[str, str]:
    """``examples/specs/*.json`` by file name (empty when gpuyard is installed without its examples)."""
    if not EXAMPLE_SPECS.is_dir():
        return {}
    return {path.name: path.read_text() for path in sorted(EXAMPLE_SPECS.glob("*.json"))}
