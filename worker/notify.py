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
A webhook's host is resolved and every address must be public (not private, loopback, link-local,
reserved or multicast) unless it lies in ``GPUYARD_NOTIFY_ALLOWED_NETWORKS``; redirects are not followed.
(The check and the request resolve the name separately, so DNS rebinding can still race it; keep the
workers behind an egress firewall where that matters.) A receiver that does not answer costs a retry in
the notify queue, never the job: its state was stored before anything was sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests

from core.errors import Problem
from core.settings import Settings
from store import Database, Job
from worker.errors import QueueUnavailable

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gpuyard-Signature"
EVENT_HEADER = "X-Gpuyard-Event"
MAX_URL_LENGTH = 2048
_WEBHOOK_SCHEMES = ("http", "https")
# apprise's generic HTTP targets: a webhook by another name, without the address check. Use http(s)://.
_REFUSED_APPRISE_SCHEMES = ("json", "jsons", "xml", "xmls", "form", "forms")


class NotifyFailed(Exception):
    """A delivery that may succeed later (no answer, 5xx, 429): the Celery task retries it."""


class NotifyRefused(Exception):
    """A delivery that never will (a forbidden address, 4xx, an unknown URL): dropped and logged."""


def url_problems(urls: Sequence[str], settings: Settings, field: str = "notify") -> list[Problem]:
    """Every problem of a notify list: too many, too long, or a scheme neither webhook nor apprise."""
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
        scheme = urlsplit(url).scheme.lower()
        if scheme in _WEBHOOK_SCHEMES:
            if not urlsplit(url).hostname:
                problems.append(Problem("invalid_url", f"Expected a webhook URL with a host. Received: {url!r}", where))
        elif scheme in _REFUSED_APPRISE_SCHEMES:
            problems.append(
                Problem(
                    "invalid_url",
                    f"Expected an http(s):// webhook instead of apprise's generic {scheme}://. Received: {url!r}",
                    where,
                )
            )
        elif not _apprise_understands(url):
            problems.append(
                Problem(
                    "invalid_url",
                    "Expected an http(s):// webhook or a URL apprise understands (slack://, mailto://, tgram://, "
                    f"...; https://github.com/caronc/apprise/wiki). Received: {_redacted(url)!r}",
                    where,
                )
            )
    return problems


def _apprise_understands(url: str) -> bool:
    import apprise  # ~0.5 s to import: only for a non-webhook URL (the API and every CLI command load this module)

    return apprise.Apprise.instantiate(url, suppress_exceptions=True) is not None


def _redacted(url: str) -> str:
    """The URL without its secrets (apprise URLs carry tokens in the path or the password)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '…'}/…" if parts.scheme else url[:16] + "…"


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


def _allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(n.strip(), strict=False) for n in settings.notify_allowed_networks.split(",") if n.strip()
    ]


def check_address(url: str, settings: Settings) -> None:
    """Refuse a webhook whose host resolves to an internal address not explicitly allowed.

    Raises:
        NotifyRefused: a private, loopback, link-local, reserved or multicast address outside the allow-list.
        NotifyFailed: the name does not resolve now (it may later).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise NotifyFailed(f"cannot resolve {host!r}: {exc}") from exc
    allowed = _allowed_networks(settings)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if any(address in network for network in allowed):
            continue
        if not address.is_global or address.is_multicast:
            raise NotifyRefused(
                f"{host} resolves to {address}, an internal address; allow it with GPUYARD_NOTIFY_ALLOWED_NETWORKS"
            )


def send_webhook(url: str, payload: dict[str, Any], secret: str, settings: Settings) -> int:
    """POST ``payload`` to ``url``, signed; return the status code.

    Raises:
        NotifyFailed: no answer, a timeout, 5xx or 429.
        NotifyRefused: a forbidden address, or another 4xx.
    """
    check_address(url, settings)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "gpuyard-notify",
        SIGNATURE_HEADER: signature(body, secret),
        EVENT_HEADER: str(payload.get("event")),
    }
    timeout = settings.notify_timeout_s
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


def send_apprise(url: str, payload: dict[str, Any]) -> None:
    """Tell a chat or e-mail URL through apprise.

    Raises:
        NotifyRefused: apprise does not know the URL.
        NotifyFailed: apprise could not deliver it.
    """
    import apprise  # ~0.5 s to import: only in the notify task, only for a non-webhook URL

    sender = apprise.Apprise()
    if not sender.add(url):
        raise NotifyRefused(f"apprise does not understand {_redacted(url)}")
    title = f"gpuyard: job {payload['job_id']} {payload['state']}"
    lines = [f"{payload.get('name') or payload['job_id']} ({payload['user']}) ended {payload['state']}"]
    if payload.get("reason"):
        lines.append(f"reason: {payload['reason']}: {payload.get('detail') or ''}")
    lines.append(payload["links"]["job"])
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
    send_apprise(url, payload)
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
