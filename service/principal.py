"""The one check of "may this principal act": used by bearer tokens, dashboard sessions and open event streams.

A principal is a user id plus a check of the credential it signed in with (the first characters of the
token's SHA-256, as stored). It may act while its user exists, is not disabled, and still holds that
credential: ``gpuyard users disable`` and ``rotate-token`` therefore end a bearer token, a session cookie
and a stream that is already open alike (streams call :func:`acting_user` again every
``principal_recheck_s``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from store import Database, User
from store.tables import hash_token

CREDENTIAL_CHECK_CHARS = 16
"""How much of the token's stored hash a session cookie (and a principal) carries: enough to tell tokens
apart, not enough to matter if a cookie were read."""


@dataclass(frozen=True)
class Principal:
    """Who is acting, and with which credential."""

    user_id: int
    credential_check: str

    @classmethod
    def of(cls, user: User) -> Principal:
        """The principal of ``user`` acting with their current token."""
        return cls(user.id, user.token_hash[:CREDENTIAL_CHECK_CHARS])

    @classmethod
    def of_token(cls, user_id: int, token: str) -> Principal:
        return cls(user_id, hash_token(token)[:CREDENTIAL_CHECK_CHARS])


def may_act(user: User | None, principal: Principal) -> bool:
    """Whether ``user`` (as read from the DB now) lets ``principal`` act: same user, enabled, same token."""
    return (
        user is not None
        and user.id == principal.user_id
        and not user.disabled
        and hmac.compare_digest(user.token_hash[:CREDENTIAL_CHECK_CHARS], principal.credential_check)
    )


def acting_user(db: Database, principal: Principal) -> User | None:
    """The principal's user if they may act now, else None (deleted, disabled, or their token rotated)."""
    user = db.get_user(principal.user_id)
    return user if may_act(user, principal) else None
