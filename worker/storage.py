"""Where data sets and job artifacts live: a small ``Storage`` interface and its local-disk implementation.

Layout under the root::

    datasets/<sha256[:2]>/<sha256>.h5     content-addressed: one file per distinct upload
    jobs/<job_id>/                        one folder per job: trainer output, logs, checkpoints
    tmp/                                  uploads being received (same file system, so renames are atomic)

Every write is atomic (a temporary file beside the target, fsynced, then renamed): a reader sees the
old file or the whole new one, never half of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from core.atomicio import atomic_write_bytes, fsync_dir
from core.names import OPERATIONS_DIR
from worker.errors import InvalidKey, UploadTooLarge

CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class StagedUpload:
    """An upload received into ``tmp/`` and hashed, not yet in place."""

    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class StoredDataset:
    sha256: str
    size_bytes: int
    key: str
    path: Path


class Storage(Protocol):
    """What the API and the workers need from storage. Keys are ``/``-separated relative paths."""

    def stage_stream(self, fileobj: IO[bytes], max_bytes: int) -> StagedUpload:
        """Copy ``fileobj`` into a staging file while hashing it; raise UploadTooLarge past ``max_bytes``."""
        ...

    def commit_dataset(self, staged: StagedUpload) -> StoredDataset:
        """Move a staged upload to its content address (or drop it when that content is already there)."""
        ...

    def discard(self, staged: StagedUpload) -> None:
        """Remove a staged upload that will not be kept."""
        ...

    def put_dataset_stream(self, fileobj: BinaryIO, max_bytes: int) -> StoredDataset:
        """stage_stream + commit_dataset."""
        ...

    def dataset_key(self, sha256: str) -> str: ...

    def job_key(self, job_id: str, name: str = "") -> str: ...

    def local_path(self, key: str) -> Path:
        """A path a local process (the trainer, ``send_file``) can open for ``key``."""
        ...

    def exists(self, key: str) -> bool: ...

    def open(self, key: str) -> BinaryIO: ...

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None:
        """Remove a file, or a job's whole folder; missing keys are fine."""
        ...

    def sweep_tmp(self, max_age_s: float) -> int:
        """Remove staging files older than ``max_age_s`` (uploads whose request died); return how many."""
        ...


class LocalStorage:
    """:class:`Storage` on a local (or network-mounted) directory.

    Args:
        root: the storage root; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # ── keys ──
    def dataset_key(self, sha256: str) -> str:
        if not _SHA256.match(sha256):
            raise InvalidKey(f"Expected a lowercase hex SHA-256. Received: {sha256!r}")
        return f"datasets/{sha256[:2]}/{sha256}.h5"

    def job_key(self, job_id: str, name: str = "") -> str:
        if not _JOB_ID.match(job_id):
            raise InvalidKey(f"Expected a job id of letters, digits, '_' and '-'. Received: {job_id!r}")
        if not name:
            return f"jobs/{job_id}"
        if not _FILE_NAME.match(name) or name in (".", ".."):
            raise InvalidKey(f"Expected a plain file name. Received: {name!r}")
        return f"jobs/{job_id}/{name}"

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path == self.root or self.root not in path.parents:
            raise InvalidKey(f"Expected a key inside the storage root. Received: {key!r}")
        return path

    # ── uploads ──
    def stage_stream(self, fileobj: IO[bytes], max_bytes: int) -> StagedUpload:
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix="upload.", suffix=".h5", dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedUpload(tmp, digest.hexdigest(), size)

    def commit_dataset(self, staged: StagedUpload) -> StoredDataset:
        key = self.dataset_key(staged.sha256)
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self.discard(staged)  # same bytes, same name: keep the copy already there
        else:
            os.replace(staged.path, target)
            fsync_dir(target.parent)
        return StoredDataset(staged.sha256, staged.size_bytes, key, target)

    def discard(self, staged: StagedUpload) -> None:
        staged.path.unlink(missing_ok=True)

    def put_dataset_stream(self, fileobj: BinaryIO, max_bytes: int) -> StoredDataset:
        return self.commit_dataset(self.stage_stream(fileobj, max_bytes))

    # ── files ──
    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def open(self, key: str) -> BinaryIO:
        return self.local_path(key).open("rb")

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.local_path(key), data)

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


    # ── housekeeping ──
    def sweep_tmp(self, max_age_s: float, *, now: float | None = None) -> int:
        """Remove files in ``tmp/`` not modified for ``max_age_s`` seconds: uploads whose request died.

        A live upload writes its staging file every chunk, so only abandoned ones are this old.

        Returns:
            How many files were removed.
        """
        cutoff = (time.time() if now is None else now) - max_age_s
        removed = 0
        for entry in os.scandir(self.root / "tmp"):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another process swept or committed it meanwhile
                continue
        return removed


def operation_dir(storage: Storage, job_id: str, operation_id: str) -> Path:
    """``jobs/<job_id>/operations/<op_id>/``: a model operation's input, request and log (the API writes the
    input there, the worker's operation reads it)."""
    return storage.local_path(storage.job_key(job_id)) / OPERATIONS_DIR / operation_id
