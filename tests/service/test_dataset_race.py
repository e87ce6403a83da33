"""A delete racing another user's upload of the same bytes never breaks the upload (content is shared)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from api_helpers import Tokens, bearer, upload
from flask import Flask
from flask.testing import FlaskClient


def test_deleting_a_data_set_while_another_user_uploads_the_same_bytes_keeps_the_file(
    app: Flask, client: FlaskClient, tokens: Tokens, digits_h5: Path
) -> None:
    svc = app.extensions["gpuyard"]
    alices = upload(client, tokens.alice, digits_h5).get_json()["id"]
    # The hook: bob's upload pauses right after it has put (or found) the content-addressed file.
    placed, go_on = threading.Event(), threading.Event()
    commit = svc.storage.commit_dataset

    def paused_commit(staged: Any) -> Any:
        stored = commit(staged)
        placed.set()
        assert go_on.wait(30)
        return stored

    svc.storage.commit_dataset = paused_commit
    answers: dict[str, Any] = {}

    def bob_uploads() -> None:
        answers["bob"] = upload(app.test_client(), tokens.bob, digits_h5)

    def alice_deletes() -> None:
        answers["alice"] = app.test_client().delete(f"/v1/datasets/{alices}", headers=bearer(tokens.alice))

    bob = threading.Thread(target=bob_uploads)
    bob.start()
    assert placed.wait(30)
    alice = threading.Thread(target=alice_deletes)
    alice.start()
    alice.join(1.0)  # the old code deleted the shared file right here, under bob's feet
    go_on.set()
    bob.join(30)
    alice.join(30)
    svc.storage.commit_dataset = commit

    assert answers["alice"].status_code == 204
    assert answers["bob"].status_code == 201, answers["bob"].get_data(as_text=True)
    bobs = svc.db.get_dataset(answers["bob"].get_json()["id"])
    assert bobs is not None and svc.storage.exists(bobs.storage_key), "bob's data set lost its file"
    assert svc.db.get_dataset(alices) is None


def test_the_last_delete_removes_the_shared_file(client: FlaskClient, tokens: Tokens, digits_h5: Path, app) -> None:  # type: ignore[no-untyped-def]
    svc = app.extensions["gpuyard"]
    alices = upload(client, tokens.alice, digits_h5).get_json()["id"]
    bobs = upload(client, tokens.bob, digits_h5).get_json()["id"]
    key = svc.db.get_dataset(alices).storage_key
    assert client.delete(f"/v1/datasets/{alices}", headers=bearer(tokens.alice)).status_code == 204
    assert svc.storage.exists(key)  # bob still uses it
    assert client.delete(f"/v1/datasets/{bobs}", headers=bearer(tokens.bob)).status_code == 204
    assert not svc.storage.exists(key)
    started = time.monotonic()
    again = upload(client, tokens.bob, digits_h5)  # the content comes back with a new upload
    assert again.status_code == 201 and svc.storage.exists(key) and time.monotonic() - started < 30
