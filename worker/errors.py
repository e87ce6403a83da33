"""The worker side's refusals: storage and the job queue (the job store's are in ``store/errors.py``).

Hierarchy::

    GpuyardError (core.errors)
    ├── StorageError               storage refused
    │   ├── UploadTooLarge         an upload passed its byte limit (nothing is kept)
    │   └── InvalidKey             a key or name would leave its folder, or is malformed
    ├── QueueUnavailable           the broker did not take a task
    └── SubmitRefused              a job that cannot be submitted as asked (worker/submit.py)

Third-party errors (SQLAlchemy, kombu/redis) are translated where they happen, ``raise ... from exc``;
``service/errors.py`` maps each of these to an HTTP answer.
"""

from __future__ import annotations

from core.errors import GpuyardError, Problem


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


class SubmitRefused(GpuyardError):
    """A job that cannot be submitted as asked (the API answers 422): ``code`` says why.

    Args:
        problems: every reason (a list: the answer lists them), or one sentence.
        code: the machine-readable reason (``model_too_large``, ``priority_too_high``, ``never_fits``, ...).
        field: the request field at fault, for a single sentence.
        prefix: where the problems' fields sit in the request (``"spec."``).
    """

    code = "submit_refused"

    def __init__(
        self, problems: list[Problem] | str, *, code: str | None = None, field: str | None = None, prefix: str = ""
    ) -> None:
        self.code = code or self.code
        super().__init__(problems)
        self.field, self.prefix, self.listed = field, prefix, not isinstance(problems, str)
