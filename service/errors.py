"""The API's errors: each carries its HTTP status and renders as ``{"error", "detail", "field"?}``.

Hierarchy::

    GpuyardError (core.errors)
    └── ApiError                  500 internal_error         base; renders every API error body
        ├── BadRequest            400 bad_request            malformed JSON, bad query value
        ├── Unauthorized          401 unauthorized           missing or unknown bearer token
        ├── Forbidden             403 forbidden              an admin-only endpoint, called by a user
        ├── NotFound              404 not_found              no such resource, or someone else's
        ├── Conflict              409 conflict               e.g. a data set still used by a job
        ├── PayloadTooLarge       413 payload_too_large
        ├── UnsupportedMediaType  415 unsupported_media_type
        ├── Unprocessable         422 validation_error       carries ``problems`` (every one found)
        │   └── DryRunFailed      422 dry_run_failed         the dry-run child crashed or ran out of time
        ├── TooManyRequests       429 too_many_active_jobs   always with Retry-After
        ├── HeadersTooLarge       431 request_header_fields_too_large
        └── ServiceUnavailable    503 service_unavailable    database, Redis or queue unreachable

Errors from below (job DB, storage, spec and data checks) are translated by :func:`to_api_error`;
:func:`scrub_paths` strips server paths from every detail before it is sent.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.errors import DataError, GpuyardError, Problem, SpecError
from core.settings import Settings
from store.errors import ActiveJobLimit, DatabaseUnavailable, DatasetInUse, UnknownDataset
from worker.errors import InvalidKey, QueueUnavailable, SubmitRefused, UploadTooLarge


class ApiError(GpuyardError):
    """An error the API answers with ``status_code`` and the JSON body of :meth:`to_dict`.

    Args:
        detail: a sentence saying what was wrong and what was expected.
        code: machine-readable error code (defaults to the class's).
        field: the request field at fault (``"spec.training.epochs"``, ``"file"``, ``"limit"``).
        problems: every problem found, for errors that can have several (422).
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    status_code = 500
    code = "internal_error"
    default_headers: dict[str, str] = {}  # noqa: RUF012 (read-only; merged into each instance's headers)

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        field: str | None = None,
        problems: list[Problem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(problems or [Problem(code or self.code, detail, field)])
        self.detail = detail
        self.code = code or self.code
        self.field = field
        self.has_problem_list = problems is not None
        self.headers = {**self.default_headers, **(headers or {})}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        if self.has_problem_list:
            body["problems"] = [p.to_dict() for p in self.problems]
        return body


class BadRequest(ApiError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ApiError):
    status_code = 422
    code = "validation_error"

    @classmethod
    def from_problems(cls, code: str, problems: list[Problem], *, prefix: str = "") -> Unprocessable:
        """A 422 listing every problem; ``prefix`` places their fields in the request (``"spec."``)."""
        if prefix:
            problems = [Problem(p.code, p.detail, f"{prefix}{p.field}" if p.field else None) for p in problems]
        summary = (
            problems[0].detail
            if len(problems) == 1
            else f"{len(problems)} problems: " + "; ".join(p.detail for p in problems)
        )
        field = problems[0].field if len(problems) == 1 else None
        return cls(summary, code=code, field=field, problems=problems)


class DryRunFailed(Unprocessable):
    """The dry-run child ended without a report for a reason other than the spec or the data (it crashed,
    or ran past its time); the detail says which."""

    code = "dry_run_failed"


class TooManyRequests(ApiError):
    """A per-user or per-process cap is full; ``Retry-After`` (seconds) says when to try again."""

    status_code = 429
    code = "too_many_active_jobs"
    default_headers = {"Retry-After": "30"}  # noqa: RUF012


class HeadersTooLarge(ApiError):
    status_code = 431
    code = "request_header_fields_too_large"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"


def to_api_error(exc: GpuyardError) -> ApiError:
    """Translate an error from a layer below into the API error a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SpecError):
        return Unprocessable.from_problems(exc.code, exc.problems, prefix="spec.")
    if isinstance(exc, DataError):
        return Unprocessable.from_problems(exc.code, exc.problems)
    if isinstance(exc, ActiveJobLimit):
        return TooManyRequests(str(exc), code=exc.code)
    if isinstance(exc, DatasetInUse):
        return Conflict(str(exc), code=exc.code)
    if isinstance(exc, UnknownDataset):
        return NotFound(str(exc), code=exc.code, field="dataset")
    if isinstance(exc, UploadTooLarge):
        return PayloadTooLarge(str(exc))
    if isinstance(exc, InvalidKey):
        return NotFound(str(exc))
    if isinstance(exc, SubmitRefused):
        if exc.listed:
            return Unprocessable.from_problems(exc.code, exc.problems, prefix=exc.prefix)
        return Unprocessable(str(exc), code=exc.code, field=exc.field)
    if isinstance(exc, QueueUnavailable):
        return ServiceUnavailable(str(exc), code=exc.code)
    if isinstance(exc, DatabaseUnavailable):
        return ServiceUnavailable("the job database is unavailable; try again shortly", code=exc.code)
    return ApiError(str(exc), code=exc.code)  # our own message: safe to show, no traceback in it


def scrub_paths(text: str, roots: Iterable[str]) -> str:
    """``text`` with every path under one of ``roots`` cut to its last component (the file's name).

    Args:
        text: an error detail.
        roots: absolute directories whose paths must not reach a client (storage, data dir, temp dir).
    """
    for root in sorted({r.rstrip("/") for r in roots if r and r != "/"}, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"(?:/[^\s'\"/:,;()]+)*/?", _last_component, text)
    return text


def _last_component(match: re.Match[str]) -> str:
    return match.group(0).rstrip("/").rsplit("/", 1)[-1] or "(server path)"


def server_roots(settings: Settings) -> list[str]:
    """Directories whose paths must not reach a client: storage, data dir, temp dir, the installation."""
    places = [settings.storage_dir, settings.data_dir, tempfile.gettempdir(), sys.prefix, sys.base_prefix]
    places.append(Path(__file__).resolve().parents[1])  # the installation (tracebacks name its files)
    roots = set()
    for place in places:
        if place is not None:
            roots.update({str(Path(place)), str(Path(place).resolve())})
    return sorted(roots)
