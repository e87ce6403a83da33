"""The dashboard's sign-in: a signed session cookie holding the user's id and a check of their token's hash.

The raw token never goes into the cookie. The cookie names a :class:`~service.principal.Principal` (the user's
id and the first characters of the token's stored SHA-256), checked at every request by the same
:func:`~service.principal.acting_user` as bearer tokens: a session ends when its user is disabled or their
token changes. The key that signs cookies and CSRF tokens is the
``secret_key`` setting or, when it is empty, a random key kept in ``<data_dir>/secret-key`` so that every
API process of the stack shares it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from flask import Flask, g, request, session
from flask.sessions import SecureCookieSessionInterface

from core.settings import Settings
from service.extensions import services
from service.principal import Principal, acting_user
from store import User

SECRET_KEY_FILE = "secret-key"
SESSION_COOKIE = "gpuyard_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRFToken"
_USER_ID = "user_id"
_TOKEN_CHECK = "token_check"


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure when the request came over HTTPS (or the config says so)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def init_sessions(app: Flask, settings: Settings) -> None:
    """The secret key and the session cookie's flags: HttpOnly, SameSite=Lax, Secure over HTTPS."""
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = settings.secret_key or load_secret_key(settings.data_dir)
    app.config["SESSION_COOKIE_NAME"] = SESSION_COOKIE
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    # CSRF tokens live as long as the session (the default one-hour limit would break open pages).
    app.config["WTF_CSRF_TIME_LIMIT"] = None
    app.config["WTF_CSRF_HEADERS"] = [CSRF_HEADER]
    # Only the dashboard's forms are checked (service.ui); API clients use bearer tokens, not cookies.
    app.config["WTF_CSRF_CHECK_DEFAULT"] = False
    app.session_interface = _SessionInterface()


def load_secret_key(data_dir: Path) -> str:
    """The key in ``<data_dir>/secret-key``, made (mode 0600) by the first process that needs it.

    Processes starting together all end up with the first key written: each writes its own to a temporary
    file and hard-links it into place, which fails when another got there first.
    """
    path = Path(data_dir) / SECRET_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text().strip()
        if key:
            return key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{SECRET_KEY_FILE}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp_name, path)
    finally:
        os.unlink(tmp_name)
    return path.read_text().strip()


def sign_in(user: User) -> None:
    """Start a fresh session for ``user`` (a new session, so a planted one cannot be kept)."""
    session.clear()
    session[_USER_ID] = user.id
    session[_TOKEN_CHECK] = Principal.of(user).credential_check


def sign_out() -> None:
    session.clear()


def session_user() -> User | None:
    """The signed-in user of this request's session cookie if they may act now (else None); the session's
    principal is kept in ``g.principal`` for checks later in the request (an event stream's)."""
    user_id = session.get(_USER_ID)
    check = session.get(_TOKEN_CHECK)
    if not isinstance(user_id, int) or not isinstance(check, str):
        return None
    principal = Principal(user_id, check)
    user = acting_user(services().db, principal)
    if user is not None:
        g.principal = principal
    return user
