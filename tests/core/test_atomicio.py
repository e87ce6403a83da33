"""Atomic writes: a reader sees the old file or the whole new one; a failed write leaves nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.atomicio import atomic_path, atomic_write_bytes, atomic_write_json, file_sha256


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]


def test_a_finished_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "summary.json"
    atomic_write_json(target, {"loss": 0.5})
    assert target.read_text() == '{\n  "loss": 0.5\n}\n'
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_the_temporary_keeps_the_suffix_writers_pick_formats_by(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "model.keras") as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")


def test_file_sha256_reads_in_chunks_and_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # several chunks of 1 KiB below
    path = tmp_path / "data.h5"
    path.write_bytes(data)
    assert file_sha256(path, chunk_bytes=1024) == hashlib.sha256(data).hexdigest()
