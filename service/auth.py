"""Bearer-token authentication: who is calling, and which rows they may see.

Token and session cookie both end in the one check of service/principal.py (user exists, is not disabled,
still holds the credential).
"""

from __future__ import annotations

from flask import g, request
from flask_wtf.csrf import validate_csrf
from wtforms import ValidationError

from service.errors import BadRequest, Unauthorized
from service.extensions import services
from service.principal import Principal, may_act
from service.sessions import CSRF_HEADER, SAFE_METHODS, session_user
from store import User

_CHALLENGE = 'Bearer realm="gpuyard"'


def authenticate() -> None:
    """``before_request`` hook of every protected blueprint: resolve the bearer token to ``g.user``.

    Without an ``Authorization`` header, the dashboard's session cookie also identifies the caller (so the
    browser can follow a job's events and download artifacts); a cookie-authenticated request that changes
    something must carry the session's CSRF token in the ``X-CSRFToken`` header, since a browser sends
    cookies with any site's requests.

    Raises:
        Unauthorized: no ``Authorization: Bearer <token>`` header (nor session), or an unknown token.
        BadRequest: a cookie-authenticated POST/DELETE without a valid CSRF token.
    """
    if "Authorization" not in request.headers:
        user = session_user()
        if user is not None:
            if request.method not in SAFE_METHODS:
                try:
                    validate_csrf(request.headers.get(CSRF_HEADER))
                except ValidationError as exc:
                    raise BadRequest(
                        f"a signed-in browser's {request.method} needs the page's CSRF token in the "
                        f"{CSRF_HEADER} header ({exc}); API clients send 'Authorization: Bearer <token>'",
                        code="csrf_failed",
                    ) from exc
            g.user = user
            return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "this endpoint needs an 'Authorization: Bearer <token>' header; "
            "create a token with 'gpuyard users create NAME'",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    found = services().db.user_for_token(token)
    principal = Principal.of_token(found.id, token) if found is not None else None
    user = found if principal is not None and may_act(found, principal) else None
    if user is None or principal is None:
        raise Unauthorized(
            "the bearer token is not valid",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    g.user = user
    g.principal = principal


def current_user() -> User:
    """The authenticated caller (set by :func:`authenticate`)."""
    return g.user


def current_principal() -> Principal:
    """Who is acting and with which credential (set by :func:`authenticate`): what a long request, an
    event stream, checks again with :func:`service.principal.acting_user` while it runs."""
    return g.principal


def visible_owner_id() -> int | None:
    """The owner filter for queries: the caller's id, or None for an admin, who sees everyone's rows."""
    user = current_user()
    return None if user.is_admin else user.id
