"""Sign-in with an API token, and sign-out."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from service.extensions import services
from service.sessions import session_user, sign_in, sign_out
from service.ui.base import bp


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | tuple[str, int] | str:
    """The sign-in form: one field, the API token ('gpuyard users create NAME' prints one)."""
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if session_user() is not None:
            return redirect(next_url)
        return render_template("ui/login.html", next=next_url, error=None)
    token = (request.form.get("token") or "").strip()
    user = services().db.user_for_token(token) if token else None
    if user is None:
        error = "That token is not valid." if token else "Enter your API token."
        return render_template("ui/login.html", next=next_url, error=error), 401
    sign_in(user)
    return redirect(next_url)


@bp.post("/logout")
def logout() -> Response:
    sign_out()
    return redirect(url_for("ui.login"))


def _safe_next(raw: str | None) -> str:
    """Where to go after signing in: a path of this site only (never another host)."""
    default = url_for("ui.jobs")
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return default
    return raw
