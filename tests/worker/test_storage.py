"""Local storage: content-addressed uploads, size limits, atomic writes, keys that cannot escape the root."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from worker.errors import InvalidKey, UploadTooLarge
from worker.storage import LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def test_upload_lands_at_its_content_address(storage: LocalStorage) -> None:
    data = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 5000  # > one chunk
    stored = storage.put_dataset_stream(io.BytesIO(data), max_bytes=len(data))
    sha = hashlib.sha256(data).hexdigest()
    assert (stored.sha256, stored.size_bytes) == (sha, len(data))
    assert stored.key == f"datasets/{sha[:2]}/{sha}.h5"
    assert storage.local_path(stored.key).read_bytes() == data
    again = storage.put_dataset_stream(io.BytesIO(data), max_bytes=len(data))
    assert again.key == stored.key
    assert list((storage.root / "tmp").iterdir()) == []  # the duplicate's staging file is gone


def test_oversize_upload_leaves_nothing(storage: LocalStorage) -> None:
    with pytest.raises(UploadTooLarge, match="limit of 10 bytes"):
        storage.put_dataset_stream(io.BytesIO(b"x" * 11), max_bytes=10)
    assert list((storage.root / "tmp").iterdir()) == []
    assert not (storage.root / "datasets").exists()


def test_staged_upload_can_be_discarded(storage: LocalStorage) -> None:
    staged = storage.stage_stream(io.BytesIO(b"abc"), max_bytes=10)
    assert staged.path.read_bytes() == b"abc"
    storage.discard(staged)
    assert not staged.path.exists()


def test_job_files_write_read_delete(storage: LocalStorage) -> None:
    key = storage.job_key("job_abc", "history.json")
    storage.write_bytes(key, b"{}")
    assert storage.exists(key)
    with storage.open(key) as fh:
        assert fh.read() == b"{}"
    storage.delete(storage.job_key("job_abc"))
    assert not storage.exists(key)
    storage.delete(key)  # missing is fine


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "..", ""])
def test_names_cannot_leave_the_job_folder(storage: LocalStorage, bad: str) -> None:
    with pytest.raises(InvalidKey):
        storage.local_path(storage.job_key("job_abc", bad)) if bad else storage.local_path("../x")


def test_bad_keys_are_refused(storage: LocalStorage) -> None:
    with pytest.raises(InvalidKey):
        storage.job_key("../job", "x")
    with pytest.raises(InvalidKey):
        storage.dataset_key("not-a-sha")
    with pytest.raises(InvalidKey):
        storage.local_path("/etc/passwd")


def test_sweep_tmp_removes_only_stale_staging_files(storage: LocalStorage) -> None:
    tmp = storage.root / "tmp"
    stale, fresh = tmp / "upload.dead.h5", tmp / "upload.live.h5"
    stale.write_bytes(b"half an upload")
    fresh.write_bytes(b"still arriving")
    hour_ago = time.time() - 3601
    os.utime(stale, (hour_ago, hour_ago))
    assert storage.sweep_tmp(3600) == 1
    assert not stale.exists() and fresh.exists()
    assert storage.sweep_tmp(3600) == 0

