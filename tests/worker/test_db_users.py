"""The job DB's users: disabling, enabling, token rotation, and the v3 migration (users.disabled)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import rewind_schema

import store as jobdb
from store import Database


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'users.db'}")
    database.migrate()
    yield database  # type: ignore[misc]
    database.dispose()


def test_disable_enable_and_rotate_take_effect_at_once(db: Database) -> None:
    user, token = db.create_user("alice")
    disabled = db.set_user_disabled("alice", True)
    assert disabled is not None and disabled.disabled is True
    assert db.user_for_token(token) is None
    assert db.set_user_disabled("alice", False) is not None
    assert db.user_for_token(token) is not None
    rotated = db.rotate_token("alice")
    assert rotated is not None
    assert db.user_for_token(token) is None
    found = db.user_for_token(rotated[1])
    assert found is not None and found.id == user.id
    assert db.set_user_disabled("nobody", True) is None and db.rotate_token("nobody") is None


def test_a_v2_database_migrates_to_users_disabled(db: Database) -> None:
    user, token = db.create_user("olduser")
    with db.engine.begin() as conn:  # back to schema 2: no users.disabled column (nor later ones)
        rewind_schema(conn.exec_driver_sql, 2)
    assert db.migrate() == jobdb.LATEST_VERSION
    found = db.user_for_token(token)
    assert found is not None and found.id == user.id and found.disabled is False


def test_a_v3_database_migrates_to_notify_columns(db: Database) -> None:
    user, token = db.create_user("olduser")
    with db.engine.begin() as conn:  # back to schema 3: no sharing nor notify columns
        rewind_schema(conn.exec_driver_sql, 3)
    assert db.migrate() == jobdb.LATEST_VERSION
    found = db.user_for_token(token)
    assert found is not None and found.notify is None and found.webhook_secret is None
    assert db.rotate_webhook_secret(user.id) == db.webhook_secret(user.id)
    assert db.claim_notifications() == []
