"""/v1/usage: GPU time from the jobs' recorded attempts, by user, day or GPU (admins: everyone's)."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, Response, request

from service.api import respond
from service.api.declare import documented, query_param
from service.auth import authenticate, visible_owner_id
from service.errors import BadRequest
from service.extensions import services
from service.schemas import UsageOut, UsageRowOut
from store.usage import GROUP_BY

bp = Blueprint("usage", __name__, url_prefix="/v1/usage")
bp.before_request(authenticate)

DEFAULT_WINDOW = dt.timedelta(days=30)


def _time(name: str, default: dt.datetime) -> dt.datetime:
    raw = request.args.get(name)
    if not raw:
        return default
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"{name}: expected an ISO 8601 date or time such as 2026-12-01 or 2026-12-01T12:00:00Z. Received: {raw!r}",
            field=name,
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@bp.get("")
@documented(
    "getUsage",
    summary="GPU time (memory fraction × seconds) from the jobs' attempts; admins see everyone's",
    params=(
        query_param("from", {"type": "string"}, "Start, ISO 8601 (default: 30 days before `to`)."),
        query_param("to", {"type": "string"}, "End, ISO 8601 (default: now)."),
        query_param("group_by", {"type": "string"}, "user, day, gpu or study (default user; jobs of no study: \"-\")."),
    ),
    responses={200: UsageOut},
    errors=(400, 401),
)
def usage() -> Response:
    """GPU-seconds (memory fraction × seconds held) of the attempts in ``[from, to)`` (default: the last 30
    days), grouped by ``user``, ``day`` or ``gpu``; an admin sees everyone's, anyone else their own."""
    now = dt.datetime.now(dt.UTC)
    end = _time("to", now)
    start = _time("from", end - DEFAULT_WINDOW)
    group_by = request.args.get("group_by", "user")
    if group_by not in GROUP_BY:
        raise BadRequest(f"group_by: expected one of {', '.join(GROUP_BY)}. Received: {group_by!r}", field="group_by")
    if end < start:
        raise BadRequest(
            f"from must not be after to. Received: from={start.isoformat()}, to={end.isoformat()}", field="from"
        )
    rows = services().db.usage(start, end, group_by, owner_id=visible_owner_id(), now=now)
    out = [
        UsageRowOut(key=r.key, gpu_seconds=r.gpu_seconds, gpu_hours=round(r.gpu_hours, 6), attempts=r.attempts)
        for r in rows
    ]
    return respond(UsageOut.model_validate({"from": start, "to": end, "group_by": group_by, "rows": out}))
