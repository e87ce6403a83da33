"""A small Python client of the gpuyard HTTP API (``requests``): data sets, jobs, events, logs, artifacts.

Every failure reaches the caller as :class:`ClientError`, carrying the API's error body
(``error``, ``detail``, ``field``, ``problems``) or, when the server could not be reached, a client-side
code (``connection_failed``, ``timeout``, ``bad_response``, ``checksum_mismatch``)::

    client = Client("http://127.0.0.1:8000", token)
    dataset = client.upload_dataset("digits.h5")
    job = client.submit(dataset["id"], spec)
    for event in client.events(job["id"]):
        print(event.event, event.data)
    client.download(job["id"], MODEL_H5, Path("out") / MODEL_H5)   # MODEL_H5: core.names
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3

from core.atomicio import atomic_path
from core.errors import GpuyardError, Problem
from core.names import MODEL_H5
from core.states import QUEUED, TERMINAL_STATES

_CHUNK_BYTES = 1024 * 1024
_RETRY_STATUSES = (502, 503, 504)


class ClientError(GpuyardError):
    """An API call failed: the API's error body, or a client-side reason when there was no answer.

    Attributes:
        status_code: the HTTP status, or None when no response came back.
        error: machine-readable code (``not_found``, ``spec_invalid``, ``connection_failed``, ...).
        detail: what was wrong and what was expected.
        field: the request field at fault, when the API named one.
        problems: every problem the API listed (422), as dicts with ``code``, ``detail``, ``field``.
    """

    code = "client_error"

    def __init__(
        self,
        error: str,
        detail: str,
        *,
        status_code: int | None = None,
        field: str | None = None,
        problems: list[dict[str, Any]] | None = None,
    ) -> None:
        listed = [Problem(p.get("code", error), p.get("detail", ""), p.get("field")) for p in problems or []]
        super().__init__(listed or [Problem(error, detail, field)])
        self.status_code = status_code
        self.error = error
        self.code = error
        self.detail = detail
        self.field = field
        self.problems_raw = problems or []

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code else ""
        where = f" [{self.field}]" if self.field else ""
        return f"{status}{self.error}{where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        if self.problems_raw:
            body["problems"] = self.problems_raw
        return body

    @classmethod
    def from_response(cls, response: requests.Response) -> ClientError:
        """The error a non-2xx response carries (its JSON body, or its status line when it has none)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return cls(
                body["error"],
                str(body.get("detail") or response.reason),
                status_code=response.status_code,
                field=body.get("field"),
                problems=body.get("problems") if isinstance(body.get("problems"), list) else None,
            )
        text = response.text.strip()[:300] if response.text else ""
        return cls(
            "http_error",
            f"{response.status_code} {response.reason}" + (f": {text}" if text else ""),
            status_code=response.status_code,
        )


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``id`` (the job event's sequence number), ``event`` (its name), ``data``."""

    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        """``data`` parsed as JSON (the API sends every job event as a JSON object)."""
        return json.loads(self.data)

    @property
    def is_terminal(self) -> bool:
        """Whether this is the job's final ``state`` event (succeeded, failed, cancelled, interrupted)."""
        if self.event != "state":
            return False
        try:
            return self.json().get("state") in TERMINAL_STATES
        except (ValueError, AttributeError):
            return False


@dataclass
class SseParser:
    """Incremental parser of a ``text/event-stream`` body (the WHATWG algorithm, minus the browser bits).

    Feed it bytes as they arrive; it returns the events completed so far. ``last_event_id`` and
    ``retry_ms`` follow the stream's ``id:`` and ``retry:`` fields.
    """

    last_event_id: str | None = None
    retry_ms: int | None = None
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _pending_cr: bool = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        self._buffer += chunk
        while True:
            if self._pending_cr and self._buffer:
                if self._buffer.startswith(b"\n"):
                    self._buffer = self._buffer[1:]  # the LF of a CRLF split across two chunks
                self._pending_cr = False
            positions = [p for p in (self._buffer.find(b"\r"), self._buffer.find(b"\n")) if p >= 0]
            if not positions:
                return events
            end = min(positions)
            line = self._buffer[:end].decode("utf-8", errors="replace")
            if self._buffer[end : end + 2] == b"\r\n":
                self._buffer = self._buffer[end + 2 :]
            else:
                self._pending_cr = self._buffer[end : end + 1] == b"\r" and end + 1 == len(self._buffer)
                self._buffer = self._buffer[end + 1 :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (the API's keep-alive)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, name = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return Event(id=self.last_event_id, event=name or "message", data="\n".join(data))


class Client:
    """The gpuyard API over HTTP.

    Args:
        url: the API's base URL, e.g. ``http://127.0.0.1:8000``.
        token: a bearer token (``gpuyard users create NAME`` prints one).
        timeout_s: connect and read timeout of ordinary calls, in seconds.
        session: a ``requests.Session`` to use (tests, connection pools).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ClientError(
                "invalid_url", f"Expected the API URL to start with http:// or https://. Received: {url!r}"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ── plumbing ──
    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> requests.Response:
        """One API call; a 2xx (or a status in ``ok``) response, else :class:`ClientError`."""
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            response = self.session.request(method, self.url + path, **kwargs)
        except requests.Timeout as exc:
            raise ClientError("timeout", f"{method} {self.url}{path} timed out ({exc})") from exc
        except requests.RequestException as exc:
            raise ClientError(
                "connection_failed", f"cannot reach the gpuyard API at {self.url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            error = ClientError.from_response(response)
            response.close()
            raise error
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(
                "bad_response",
                f"{method} {path} answered {response.status_code} with a body that is not JSON",
                status_code=response.status_code,
            ) from exc

    # ── health ──
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def ready(self) -> dict[str, Any]:
        """``/v1/ready``'s body; 503 (a dependency down) is an answer here, not an error."""
        return self._json("GET", "/v1/ready", ok=(503,))

    # ── data sets ──
    def upload_dataset(
        self, path: str | os.PathLike[str], *, name: str | None = None, **keys: str | int
    ) -> dict[str, Any]:
        """Upload an HDF5 file, streamed from disk (never read whole into memory).

        Args:
            path: the file.
            name: a name to remember it by (default: the file's name).
            keys: HDF5 keys to check instead of the defaults (``x_train="X"``, ``num_classes=10``, ...).

        Returns:
            The data set (``id``, ``sha256``, ``summary``, ...), new or the one you already had.
        """
        path = Path(path)
        params = {"name": name or path.name, **{k: str(v) for k, v in keys.items()}}
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise ClientError("file_unreadable", f"cannot read {path}: {exc.strerror}", field="file") from exc
        with fh:
            # A file object as the body: requests streams it with a Content-Length from its size.
            return self._json(
                "POST",
                "/v1/datasets",
                params=params,
                data=fh,
                headers={"Content-Type": "application/x-hdf5"},
                timeout=(self.timeout_s, max(self.timeout_s, 600.0)),
            )

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")["datasets"]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    # ── jobs ──
    def submit(self, dataset: str, spec: dict[str, Any], dry_run: bool = False, priority: int = 0) -> dict[str, Any]:
        """Queue a job (the job), or with ``dry_run`` report what it would build (parameters, layers) and
        where and when it would start."""
        return self._json(
            "POST",
            "/v1/jobs",
            params={"dry_run": "1"} if dry_run else None,
            json={"dataset": dataset, "spec": spec, "priority": priority},
            timeout=(self.timeout_s, max(self.timeout_s, 180.0)) if dry_run else self.timeout_s,
        )

    def usage(self, *, start: str | None = None, end: str | None = None, group_by: str = "user") -> dict[str, Any]:
        """GET /v1/usage: GPU time by user, day or GPU (``start``/``end``: ISO 8601)."""
        params = {"group_by": group_by, **({"from": start} if start else {}), **({"to": end} if end else {})}
        return self._json("GET", "/v1/usage", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, state: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """Your jobs (an admin's: everyone's), newest first; all pages, up to ``limit`` per request."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state
        found: list[dict[str, Any]] = []
        while True:
            page = self._json("GET", "/v1/jobs", params=params)
            found.extend(page["jobs"])
            if not page.get("next_cursor"):
                return found
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    # ── studies ──
    def create_study(self, study: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Submit a study (docs/studies.md): the study with its first trials queued, or with ``dry_run``
        its trial count, largest trial and where the first trials would start."""
        return self._json(
            "POST",
            "/v1/studies",
            params={"dry_run": "1"} if dry_run else None,
            json=study,
            timeout=max(self.timeout_s, 120.0),
        )

    def study(self, study_id: str) -> dict[str, Any]:
        """One study with every trial (params, state, objective, reason, job) and its best trial."""
        return self._json("GET", f"/v1/studies/{study_id}")

    def studies(self) -> list[dict[str, Any]]:
        """Your studies (an admin's: everyone's), newest first."""
        return list(self._json("GET", "/v1/studies")["studies"])

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        """Cancel a study: no new trials; its queued and running trials are cancelled."""
        return self._json("POST", f"/v1/studies/{study_id}/cancel")

    def download_best(self, study_id: str, dest: str | os.PathLike[str], name: str = MODEL_H5) -> Path:
        """Download an artifact (default ``model.h5``) of the study's best succeeded trial into ``dest``.

        Raises:
            ClientError: the study has no succeeded trial yet (code ``no_best_trial``).
        """
        best = self.study(study_id).get("best")
        if not best or not best.get("job"):
            raise ClientError("no_best_trial", f"study {study_id} has no succeeded trial yet", status_code=409)
        return self.download(best["job"], name, dest)

    def logs(self, job_id: str) -> str:
        """The trainer's log (its stderr) so far."""
        return self.request("GET", f"/v1/jobs/{job_id}/logs").text

    def events(
        self,
        job_id: str,
        last_event_id: str | int | None = None,
        *,
        read_timeout_s: float = 60.0,
        max_reconnects: int = 10,
    ) -> Iterator[Event]:
        """The job's events as they happen, from after ``last_event_id`` (default: from the first).

        Ends after the terminal ``state`` event. A dropped connection (or a read that hears nothing, not
        even the API's keep-alive, for ``read_timeout_s``) is reopened with ``Last-Event-ID``, so no event
        is lost or repeated; after ``max_reconnects`` attempts in a row without a new event it gives up.

        Raises:
            ClientError: the job does not exist or is not yours, or the API stayed unreachable.
        """
        last = None if last_event_id is None else str(last_event_id)
        failures = 0
        delay_s = 0.5
        while True:
            parser = SseParser(last_event_id=last)
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            received = False
            dropped: Exception | None = None
            try:
                response = self.request(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    stream=True,
                    timeout=(self.timeout_s, read_timeout_s),
                )
            except ClientError as exc:
                # 401, 404, ... are answers; no answer, or a proxy's/gunicorn's 502-504, is a dropped stream.
                if exc.status_code is not None and exc.status_code not in _RETRY_STATUSES:
                    raise
                dropped = exc
            else:
                with response:
                    try:
                        for chunk in _chunks(response):
                            for event in parser.feed(chunk):
                                received = True
                                last = parser.last_event_id
                                yield event
                                if event.is_terminal:
                                    return
                    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                        dropped = exc
                if parser.retry_ms is not None:
                    delay_s = parser.retry_ms / 1000
            if dropped is None and self._job_is_terminal(job_id):
                return  # the stream ended on purpose: the job is over (its terminal event came before)
            failures = 0 if received else failures + 1
            if failures > max_reconnects:
                raise ClientError(
                    "stream_failed",
                    f"the event stream of job {job_id} dropped {failures} times in a row"
                    + (f" (last: {type(dropped).__name__}: {dropped})" if dropped else ""),
                ) from dropped
            time.sleep(delay_s if received else min(delay_s * failures, 10.0))

    def _job_is_terminal(self, job_id: str) -> bool:
        try:
            return self.job(job_id).get("state") in TERMINAL_STATES
        except ClientError as exc:
            if exc.status_code is not None:
                raise
            return False

    def download(self, job_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """Download artifact ``name`` of a job to ``dest`` (a file, or a folder to put ``name`` in).

        Streamed to a temporary file beside ``dest``, hashed on the way; renamed onto ``dest`` only when
        its SHA-256 matches the API's ETag, so ``dest`` is never half-written or wrong.

        Returns:
            The path written.

        Raises:
            ClientError: the API refused (404: no such artifact yet), or ``checksum_mismatch``.
        """
        target = Path(dest)
        if target.is_dir():
            target = target / name
        response = self.request(
            "GET", f"/v1/jobs/{job_id}/artifacts/{name}", stream=True, timeout=(self.timeout_s, 300.0)
        )
        expected = (response.headers.get("ETag") or "").removeprefix("W/").strip('"').lower()
        digest = hashlib.sha256()
        with response, atomic_path(target) as tmp:
            try:
                with tmp.open("wb") as fh:
                    for chunk in response.iter_content(_CHUNK_BYTES):
                        digest.update(chunk)
                        fh.write(chunk)
            except requests.RequestException as exc:
                raise ClientError(
                    "connection_failed", f"the download of {name} of job {job_id} broke off: {exc}"
                ) from exc
            if expected and digest.hexdigest() != expected:
                raise ClientError(
                    "checksum_mismatch",
                    f"{name} of job {job_id}: SHA-256 {digest.hexdigest()} does not match the ETag {expected}; "
                    f"{target} was not written",
                )
        return target

    # ── model operations: evaluate, predict, export a succeeded job's model (run by a worker) ──
    def evaluate(
        self, job_id: str, dataset: str, *, split: str = "test", wait: bool = True, timeout_s: float = 600.0
    ) -> dict[str, Any]:
        """The job's model measured on data set ``dataset``'s ``split``: ``result["metrics"]`` once done.

        Returns:
            The operation (``id``, ``state``, ``result``); with ``wait``, once it succeeded.

        Raises:
            ClientError: the API refused (404, 409 job not finished, 422 data set mismatch), the operation
                failed (``operation_failed``), or ``timeout_s`` passed first (``timeout``).
        """
        operation = self._json("POST", f"/v1/jobs/{job_id}/evaluate", json={"dataset": dataset, "split": split})
        return self.wait_operation(job_id, operation, timeout_s) if wait else operation

    def predict(
        self,
        job_id: str,
        inputs: list[Any] | str | os.PathLike[str],
        *,
        wait: bool = True,
        timeout_s: float = 600.0,
    ) -> dict[str, Any]:
        """Predictions of the job's model for a small batch: rows as nested lists, or an HDF5 file (a path)
        holding them as ``X``. ``result["predictions"]`` (and ``result["classes"]`` for a classifier)."""
        if isinstance(inputs, list):
            operation = self._json("POST", f"/v1/jobs/{job_id}/predict", json={"inputs": inputs})
        else:
            path = Path(inputs)
            try:
                body = path.read_bytes()
            except OSError as exc:
                raise ClientError("file_unreadable", f"cannot read {path}: {exc.strerror}", field="file") from exc
            operation = self._json(
                "POST", f"/v1/jobs/{job_id}/predict", data=body, headers={"Content-Type": "application/x-hdf5"}
            )
        return self.wait_operation(job_id, operation, timeout_s) if wait else operation

    def export(self, job_id: str, formats: list[str], *, wait: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
        """Export the job's model (``onnx``, ``saved_model``); then :meth:`download` ``model.onnx`` or
        ``saved_model.zip``."""
        operation = self._json("POST", f"/v1/jobs/{job_id}/export", json={"formats": formats})
        return self.wait_operation(job_id, operation, timeout_s) if wait else operation

    def operation(self, job_id: str, operation_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/operations/{operation_id}")

    def wait_operation(
        self, job_id: str, operation: dict[str, Any], timeout_s: float = 600.0, *, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """Poll an operation until it succeeded (returned) or failed (:class:`ClientError`)."""
        deadline = time.monotonic() + timeout_s
        while operation.get("state") not in TERMINAL_STATES:
            if time.monotonic() >= deadline:
                hint = (
                    " (no worker took it: operations run on the CPU queue, GPUYARD_TRAIN_QUEUE; is a CPU worker up?)"
                    if operation.get("state") == QUEUED
                    else ""
                )
                raise ClientError(
                    "timeout",
                    f"operation {operation.get('id')} on job {job_id} is still {operation.get('state')} after "
                    f"{timeout_s:g} s{hint}; GET /v1/jobs/{job_id}/operations/{operation.get('id')} tells when it "
                    "ends",
                )
            time.sleep(poll_s)
            operation = self.operation(job_id, operation["id"])
        if operation.get("error_reason"):
            raise ClientError(
                "operation_failed",
                f"{operation.get('kind')} of job {job_id} failed: {operation['error_reason']}: "
                f"{operation.get('error_detail') or ''}",
            )
        return operation


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body's bytes as they arrive (``iter_content(None)`` yields each chunk of a chunked response;
    ``read1`` does the same for a body delimited by the connection's close)."""
    raw = response.raw
    if raw.chunked or not hasattr(raw, "read1"):
        yield from response.iter_content(chunk_size=None)
        return
    while chunk := raw.read1(65536):
        yield chunk
