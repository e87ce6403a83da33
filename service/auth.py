"""Bearer-token authentication: who is calling, and which rows they may see."""

from __future__ import annotations

from flask import g, request

from service.errors import Unauthorized
from service.extensions import services
from worker.db import User

_CHALLENGE = 'Bearer realm="gpuyard"'


def authenticate() -> None:
    """``before_request`` hook of every protected blueprint: resolve the bearer token to ``g.user``.

    Raises:
        Unauthorized: no ``Authorization: Bearer <token>`` header, or an unknown token.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "this endpoint needs an 'Authorization: Bearer <token>' header; "
            "create a token with 'gpuyard users create NAME'",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    user = services().db.user_for_token(token)
    if user is None:
        raise Unauthorized(
            "the bearer token is not valid",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    g.user = user


def current_user() -> User:
    """The authenticated caller (set by :func:`authenticate`)."""
    return g.user


def visible_owner_id() -> int | None:
    """The owner filter for queries: the caller's id, or None for an admin, who sees everyone's rows."""
    user = current_user()
    return None if user.is_admin else user.id
