"""Notifications when a job ends: signed webhooks and the chat/e-mail URLs that apprise understands.

::

    terminal state (any path: supervisor, janitor, cancel, broker down) ── same transaction ──▶ jobs.notify_pending
    enqueue_notifications (after each supervised job, every janitor pass) ── claims it ──▶ gpuyard.notify(job, url)
    gpuyard.notify (a Celery worker, never a request thread) ──▶ deliver() ── NotifyFailed ──▶ retry with backoff

A job's URLs are its own ``notify`` list, else its owner's default list. ``http``/``https`` URLs get a
webhook: a JSON body (:func:`job_payload`) POSTed with ``X-Gpuyard-Signature: sha256=<hex HMAC-SHA256 of the
body>`` keyed by the owner's webhook secret. Any other scheme goes to apprise (``slack://``, ``mailto://``,
``tgram://``…), except apprise's own generic HTTP ones (``json://``, ``xml://``, ``form://`` and their ``s``
forms), which would bypass the webhook's address check.

Server-side request forgery: a shared service POSTing wherever a user says could reach internal hosts.
Every URL's target host (a webhook's own; an apprise URL's as apprise itself parses it, the SMTP server for
``mailto://``) is resolved and every address must be public unless it lies in
``GPUYARD_NOTIFY_ALLOWED_NETWORKS`` (worker/egress.py): at submit (a 422 naming the URL and the address)
and again when sending, where every name the sender resolves is checked as it is resolved. Redirects are
not followed. Apprise's notifications on the worker's own host (syslog, desktop pop-ups) are refused, and
so is a scheme whose host apprise cannot name. A name that does not resolve at submit is accepted (the
send checks it again). A receiver that does not answer costs a retry in the notify queue, never the job:
its state was stored before anything was sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from core.errors import Problem
from core.settings import Settings
from store import Database, Job
from worker import egress
from worker.errors import QueueUnavailable

if TYPE_CHECKING:
    from apprise.plugins.base import NotifyBase

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gpuyard-Signature"
EVENT_HEADER = "X-Gpuyard-Event"
MAX_URL_LENGTH = 2048
_WEBHOOK_SCHEMES = ("http", "https")
# apprise's generic HTTP targets: a webhook by another name, without the address check. Use http(s)://.
_REFUSED_APPRISE_SCHEMES = ("json", "jsons", "xml", "xmls", "form", "forms")
# apprise's notifications on the machine that sends them (its syslog, its desktop): nothing a user of a
# shared service may reach.
_LOCAL_APPRISE_SCHEMES = (
    "syslog", "dbus", "kde", "qt", "glib", "gio", "gnome", "macosx", "windows", "blink1",
)  # fmt: skip


class NotifyFailed(Exception):
    """A delivery that may succeed later (no answer, 5xx, 429): the Celery task retries it."""


class NotifyRefused(Exception):
    """A delivery that never will (a forbidden address, 4xx, an unknown URL): dropped and logged."""


def url_problems(urls: Sequence[str], settings: Settings, field: str = "notify") -> list[Problem]:
    """Every problem of a notify list: too many, too long, a scheme neither webhook nor apprise, or a target
    that resolves to an address a notification may not reach (a name that does not resolve yet passes)."""
    problems: list[Problem] = []
    if len(urls) > settings.notify_max_urls:
        problems.append(
            Problem(
                "too_many_urls",
                f"Expected at most {settings.notify_max_urls} notify URLs. Received: {len(urls)}",
                field,
            )
        )
    for index, url in enumerate(urls):
        where = f"{field}[{index}]"
        if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
            problems.append(
                Problem("invalid_url", f"Expected a URL of 1-{MAX_URL_LENGTH} characters. Received: {url!r:.80}", where)
            )
            continue
        try:
            check_url(url, settings)
        except NotifyRefused as exc:
            code = "address_refused" if isinstance(exc, AddressRefused) else "invalid_url"
            problems.append(Problem(code, str(exc), where))
        except NotifyFailed:
            pass  # the name does not resolve now; the send checks it again
    return problems


class AddressRefused(NotifyRefused):
    """The URL's target is (or resolves to) an address a notification may not reach."""


def target_of(url: str) -> tuple[str, int | None] | None:
    """The host and port ``url`` sends to, as its own parser reads them; None for an apprise service whose
    endpoint apprise fixes itself (``slack://``, ``tgram://``…).

    Raises:
        NotifyRefused: a scheme that is neither a webhook nor an apprise URL gpuyard accepts, or one
            whose host cannot be determined.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in _WEBHOOK_SCHEMES:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise NotifyRefused(f"Expected a webhook URL with a valid port. Received: {_redacted(url)!r}") from exc
        if not parts.hostname:
            raise NotifyRefused(f"Expected a webhook URL with a host. Received: {url!r}")
        return parts.hostname, port or (443 if scheme == "https" else 80)
    if scheme in _REFUSED_APPRISE_SCHEMES:
        raise NotifyRefused(
            f"Expected an http(s):// webhook instead of apprise's generic {scheme}://. Received: {url!r}"
        )
    if scheme in _LOCAL_APPRISE_SCHEMES:
        raise NotifyRefused(
            f"Expected a notification over the network; {scheme}:// notifies the worker's own host. Received: {url!r}"
        )
    plugin = _apprise_plugin(url)
    if plugin is None:
        raise NotifyRefused(
            "Expected an http(s):// webhook or a URL apprise understands (slack://, mailto://, tgram://, "
            f"...; https://github.com/caronc/apprise/wiki). Received: {_redacted(url)!r}"
        )
    templates = [str(t) for t in getattr(type(plugin), "templates", ())]
    if not any("{host}" in t for t in templates):
        return None  # the service's own endpoint; the send's guard still checks what it resolves
    # The server contacted: an e-mail plugin's SMTP server (derived from the address or ?smtp=), else the host.
    host = str(getattr(plugin, "smtp_host", None) or getattr(plugin, "host", None) or "").strip("[]")
    if host:
        port = getattr(plugin, "port", None)
        return host, int(port) if isinstance(port, int) else None
    if all("{host}" in t for t in templates):
        raise NotifyRefused(f"Expected a {scheme}:// URL naming its server's host. Received: {_redacted(url)!r}")
    return None  # a hosted default (ntfy://topic goes to ntfy.sh)


def check_url(url: str, settings: Settings) -> None:
    """Refuse a URL gpuyard does not send to, or whose target resolves to an internal address not allowed.

    Raises:
        AddressRefused: a loopback, private, link-local, unspecified, reserved or multicast address outside
            ``GPUYARD_NOTIFY_ALLOWED_NETWORKS``.
        NotifyRefused: an unknown scheme, or one whose host cannot be determined.
        NotifyFailed: the name does not resolve now (it may later).
    """
    target = target_of(url)
    if target is None:
        return
    host, port = target
    try:
        problem = egress.host_problem(host, port, egress.allowed_networks(settings))
    except (socket.gaierror, UnicodeError) as exc:
        raise NotifyFailed(f"cannot resolve {host!r}: {exc}") from exc
    if problem is not None:
        raise AddressRefused(f"{_redacted(url)} {problem}")


def _apprise_plugin(url: str) -> NotifyBase | None:
    """The apprise plugin ``url`` names, parsed by apprise itself; None when apprise does not know it."""
    import apprise  # ~0.5 s to import: only for a non-webhook URL (the API and every CLI command load this module)

    plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    return plugin if isinstance(plugin, apprise.plugins.NotifyBase) else None


def _redacted(url: str) -> str:
    """The URL without its secrets (paths, passwords and queries of apprise URLs and webhooks carry tokens)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url[:16] + "…"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    host = parts.hostname or "…"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}/…"


def urls_of(job: Job) -> list[str]:
    """The URLs told when ``job`` ends: its own list (even an empty one), else its owner's defaults."""
    if job.notify is not None:
        return list(job.notify)
    return list(job.owner.notify or [])


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_payload(job: Job, settings: Settings) -> dict[str, Any]:
    """The webhook's JSON body: which job, how it ended, when, and where to look."""
    base = settings.url.rstrip("/")
    return {
        "event": "job.finished",
        "job_id": job.id,
        "state": job.state,
        "reason": job.error_reason,
        "detail": job.error_detail,
        "exit_code": job.exit_code,
        "user": job.owner.name,
        "name": (job.spec or {}).get("name"),
        "attempts": job.attempts,
        "queued_at": _iso(job.queued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "metrics": (job.last_progress or {}).get("final_metrics"),
        "links": {
            "job": f"{base}/v1/jobs/{job.id}",
            "events": f"{base}/v1/jobs/{job.id}/events",
            "logs": f"{base}/v1/jobs/{job.id}/logs",
            "artifacts": f"{base}/v1/jobs/{job.id}/artifacts/",
            "dashboard": f"{base}/ui/jobs/{job.id}",
        },
    }


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of the exact body bytes with the user's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@contextlib.contextmanager
def _guarded(url: str, settings: Settings) -> Iterator[None]:
    """Check ``url`` again, then check every address the send resolves (worker/egress.py) while it runs.

    Raises:
        AddressRefused: the target, or a name resolved during the send, is an internal address.
    """
    check_url(url, settings)
    with egress.guarded(egress.allowed_networks(settings)) as guard:
        try:
            yield
        finally:
            if guard.refused:  # the send failed at a refused address, whatever its library made of that
                raise AddressRefused(f"{_redacted(url)}: {guard.refused[0]}")


def send_webhook(url: str, payload: dict[str, Any], secret: str, settings: Settings) -> int:
    """POST ``payload`` to ``url``, signed; return the status code.

    Raises:
        NotifyFailed: no answer, a timeout, 5xx or 429.
        NotifyRefused: a forbidden address, or another 4xx.
    """
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "gpuyard-notify",
        SIGNATURE_HEADER: signature(body, secret),
        EVENT_HEADER: str(payload.get("event")),
    }
    timeout = settings.notify_timeout_s
    with _guarded(url, settings):
        try:
            response = requests.post(url, data=body, headers=headers, timeout=(timeout, timeout), allow_redirects=False)
        except requests.RequestException as exc:
            raise NotifyFailed(f"{type(exc).__name__}: {exc}") from exc
    with response:
        if response.status_code >= 500 or response.status_code == 429:
            raise NotifyFailed(f"the receiver answered {response.status_code}")
        if response.status_code >= 400:
            raise NotifyRefused(f"the receiver answered {response.status_code}")
        return response.status_code


def send_apprise(url: str, payload: dict[str, Any], settings: Settings) -> None:
    """Tell a chat or e-mail URL through apprise.

    Raises:
        NotifyRefused: apprise does not know the URL, or it reaches a forbidden address.
        NotifyFailed: apprise could not deliver it.
    """
    import apprise  # ~0.5 s to import: only in the notify task, only for a non-webhook URL

    title = f"gpuyard: job {payload['job_id']} {payload['state']}"
    lines = [f"{payload.get('name') or payload['job_id']} ({payload['user']}) ended {payload['state']}"]
    if payload.get("reason"):
        lines.append(f"reason: {payload['reason']}: {payload.get('detail') or ''}")
    lines.append(payload["links"]["job"])
    with _guarded(url, settings):
        sender = apprise.Apprise()
        if not sender.add(url):
            raise NotifyRefused(f"apprise does not understand {_redacted(url)}")
        if not sender.notify(title=title, body="\n".join(lines)):
            raise NotifyFailed(f"apprise could not deliver to {_redacted(url)}")


def deliver(job_id: str, url: str, settings: Settings, db: Database) -> str:
    """Send job ``job_id``'s end to ``url`` (the body of the ``gpuyard.notify`` task); returns what happened.

    Raises:
        NotifyFailed: worth a retry.
        NotifyRefused: never worth one.
    """
    job = db.get_job(job_id)
    if job is None:
        return "the job no longer exists"
    payload = job_payload(job, settings)
    if urlsplit(url).scheme.lower() in _WEBHOOK_SCHEMES:
        status = send_webhook(url, payload, db.webhook_secret(job.owner_id), settings)
        return f"webhook answered {status}"
    send_apprise(url, payload, settings)
    return "sent through apprise"


NotifySender = Callable[[str, str], None]
"""``send(job_id, url)``: put ``gpuyard.notify(job_id, url)`` on the notify queue (worker/queues.py)."""


def enqueue_notifications(db: Database, send: NotifySender, *, limit: int = 100) -> int:
    """Hand every job that ended since the last call to the notify queue: one task per URL.

    A job whose tasks cannot be sent (the broker is down) is marked pending again for the next call.
    Never raises for the queue; returns how many tasks were sent.
    """
    sent = 0
    for job in db.claim_notifications(limit):
        urls = urls_of(job)
        for index, url in enumerate(urls):
            try:
                send(job.id, url)
            except QueueUnavailable as exc:
                log.warning("job %s: notifications not queued (%s); the next pass tries again", job.id, exc)
                if index == 0:
                    db.mark_notify_pending(job.id)
                return sent
            sent += 1
    return sent
