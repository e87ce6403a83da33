"""The worker side's refusals: storage and the job queue (the job store's are in ``store/errors.py``).

Hierarchy::

    GpuyardError (core.errors)
    ├── StorageError               storage refused
    │   ├── UploadTooLarge         an upload passed its byte limit (nothing is kept)
    │   └── InvalidKey             a key or name would leave its folder, or is malformed
    └── QueueUnavailable           the broker did not take a task

Third-party errors (SQLAlchemy, kombu/redis) are translated where they happen, ``raise ... from exc``;
``service/errors.py`` maps each of these to an HTTP answer.
"""

from __future__ import annotations

from core.errors import GpuyardError


class StorageError(GpuyardError):
    """Base of storage refusals."""

    code = "storage_error"


class UploadTooLarge(StorageError):
    code = "payload_too_large"


class InvalidKey(StorageError):
    code = "invalid_key"


class QueueUnavailable(GpuyardError):
    """The broker (Redis) did not take a task; the job stays where it was."""

    code = "queue_unavailable"
