"""The job DB's users: disabling, enabling, token rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

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
