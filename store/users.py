"""Users: accounts, tokens, priorities, notification defaults and webhook secrets."""

from __future__ import annotations

import re
import secrets

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from store.base import StoreBase, rowcount
from store.engine import reading
from store.errors import UserExists
from store.tables import (
    User,
    hash_token,
    utcnow,
)

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_USER_FOR_TOKEN = select(User.__table__).where(
    User.__table__.c.token_hash == bindparam("token_hash"), User.__table__.c.disabled.is_(False)
)


class UsersStore(StoreBase):
    """Users and their credentials."""

    # ── users ──
    def create_user(self, name: str, *, is_admin: bool = False) -> tuple[User, str]:
        """Create a user and return it with its bearer token (shown once; only its hash is stored).

        Raises:
            ValueError: the name is not 1–64 letters, digits, ``_ . -``.
            UserExists: the name is taken.
        """
        if not _USER_NAME.match(name):
            raise ValueError(f"Expected a user name of 1-64 letters, digits, '_', '.', '-'. Received: {name!r}")
        token = "gy_" + secrets.token_urlsafe(32)
        try:
            with self._begin() as s:
                user = User(name=name, is_admin=is_admin, token_hash=hash_token(token), created_at=utcnow())
                s.add(user)
                s.flush()
        except IntegrityError as exc:
            raise UserExists(f"a user named {name!r} already exists") from exc
        return user, token

    def user_for_token(self, token: str) -> User | None:
        """The user whose token this is, or None (also for a disabled user).

        Every API request asks this: one prepared Core ``SELECT`` without an ORM session (a third of the
        ORM load's cost on SQLite); the user comes back detached, its columns loaded.
        """
        with reading(self.engine) as conn:
            row = conn.execute(_USER_FOR_TOKEN, {"token_hash": hash_token(token)}).first()
        return None if row is None else User(**row._asdict())

    def set_user_disabled(self, name: str, disabled: bool) -> User | None:
        """Disable a user (their token stops working at its next request) or enable them again; None if no
        such user."""
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.disabled = disabled
            return user

    def rotate_token(self, name: str) -> tuple[User, str] | None:
        """Give a user a new token (returned once) and void the old one at once; None if no such user."""
        token = "gy_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.token_hash = hash_token(token)
        return (user, token) if user is not None else None

    def set_max_priority(self, name: str, max_priority: int, *, may_pin: bool | None = None) -> User | None:
        """Set the highest priority ``name`` may give a job, and (when given) whether they may submit
        ``resources.preemptible: false``; None when there is no such user."""
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.max_priority = max_priority
                if may_pin is not None:
                    user.may_pin = may_pin
            return user

    def rotate_webhook_secret(self, user_id: int) -> str | None:
        """Give a user a new webhook signing secret and return it (the one time it is shown); None if no
        such user. Webhooks sent from then on are signed with it."""
        secret = "whsec_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            changed = rowcount(s.execute(
                update(User)
                .where(User.id == user_id)
                .values(webhook_secret=secret)
                .execution_options(synchronize_session=False)
            ))
        return secret if changed == 1 else None

    def webhook_secret(self, user_id: int) -> str:
        """The user's webhook signing secret, created on first use (the user rotates it to learn it).

        Raises:
            KeyError: no such user.
        """
        with self._begin() as s:
            current = s.scalar(select(User.webhook_secret).where(User.id == user_id))
        if current:
            return current
        candidate = "whsec_" + secrets.token_urlsafe(32)
        with self._begin() as s:
            s.execute(
                update(User)
                .where(User.id == user_id, User.webhook_secret.is_(None))
                .values(webhook_secret=candidate)
                .execution_options(synchronize_session=False)
            )
            secret = s.scalar(select(User.webhook_secret).where(User.id == user_id))
        if secret is None:
            raise KeyError(f"user {user_id} does not exist")
        return secret

    def set_user_notify(self, user_id: int, urls: list[str] | None) -> User | None:
        """Set the notify URLs of the user's jobs that name none (None or []: no default); None if no user."""
        with self._begin() as s:
            user = s.get(User, user_id)
            if user is not None:
                user.notify = list(urls) if urls else None
            return user

    def user_by_name(self, name: str) -> User | None:
        with self._begin() as s:
            return s.scalar(select(User).where(User.name == name))

    def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None (the dashboard's session names its user by id)."""
        with self._begin() as s:
            return s.get(User, user_id)

    def list_users(self) -> list[User]:
        with self._begin() as s:
            return list(s.scalars(select(User).order_by(User.id)))
