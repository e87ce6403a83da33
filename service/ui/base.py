"""The dashboard's blueprint: sign-in guard, CSRF check of every form, HTML error pages, template helpers."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, g, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from core.errors import GpuyardError
from core.states import ACTIVE_STATES, JOB_STATES, QUEUED, RUNNING, TERMINAL_STATES
from service.errors import to_api_error
from service.extensions import csrf
from service.sessions import session_user
from store import User

bp = Blueprint(
    "ui",
    __name__,
    url_prefix="/ui",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

root = Blueprint("root", __name__)
"""``/``: the dashboard's front door."""

_PUBLIC_ENDPOINTS = frozenset({"ui.login", "ui.static"})


@root.get("/")
def home() -> Response:
    return redirect(url_for("ui.jobs"))


@bp.before_request
def guard() -> Response | None:
    """Every POST carries the form's CSRF token (400 otherwise); every page but the sign-in needs a session."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        csrf.protect()
    if request.endpoint in _PUBLIC_ENDPOINTS:
        return None
    user = session_user()
    if user is None:
        target = request.full_path.rstrip("?") if request.method == "GET" else url_for("ui.jobs")
        if request.headers.get("HX-Request"):  # a live fragment of a page whose session ended
            return Response(status=204, headers={"HX-Redirect": url_for("ui.login", next=target)})
        return redirect(url_for("ui.login", next=target))
    g.user = user
    return None


# Scripts and connections from this site only (no inline script runs; the pages' data sits in JSON
# script blocks); inline styles stay allowed for the memory bars' widths and htmx's indicator style.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def ui_user() -> User:
    """The signed-in user (set by :func:`guard`)."""
    return g.user


def ui_owner_id() -> int | None:
    """The owner filter of the signed-in user: their id, or None for an admin (everyone's rows)."""
    user = ui_user()
    return None if user.is_admin else user.id


@bp.errorhandler(CSRFError)
def csrf_error(exc: CSRFError) -> tuple[str, int]:
    return _error_page(400, "The form's security token was missing or wrong", exc.description or ""), 400


@bp.errorhandler(GpuyardError)
def gpuyard_error(exc: GpuyardError) -> tuple[str, int]:
    error = to_api_error(exc)
    problems = exc.problems if len(exc.problems) > 1 else []
    return _error_page(error.status_code, _TITLES.get(error.status_code, "Error"), error.detail, problems), (
        error.status_code
    )


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return _error_page(status, exc.name or "Error", exc.description or ""), status


_TITLES = {400: "Bad request", 403: "Not allowed", 404: "Not found", 409: "Conflict", 422: "Refused"}


def _error_page(status: int, title: str, detail: str, problems: Any = ()) -> str:
    return render_template("ui/error.html", status=status, title=title, detail=detail, problems=problems)


@bp.app_context_processor
def template_globals() -> dict[str, Any]:
    return {
        "ui_current_user": g.get("user") if request and request.blueprint == "ui" else None,
        "JOB_STATES": JOB_STATES,
        "ACTIVE_STATES": ACTIVE_STATES,
        "TERMINAL_STATES": TERMINAL_STATES,
        "QUEUED": QUEUED,
        "RUNNING": RUNNING,
    }


@bp.app_template_filter("bytes")
def format_bytes(value: float | None) -> str:
    """1536 → '1.5 KiB'; None → '—'."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@bp.app_template_filter("duration")
def format_duration(seconds: float | None) -> str:
    """75 → '1 min 15 s'; None → '—'."""
    if seconds is None:
        return "—"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


@bp.app_template_filter("when")
def format_when(value: dt.datetime | None) -> str:
    """A UTC time as '2026-11-30 03:07:18 UTC'; None → '—'."""
    if value is None:
        return "—"
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("num")
def format_number(value: Any) -> str:
    """A metric for a table: 4 significant digits; anything else as is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)
