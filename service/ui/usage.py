"""The usage page: GPU-hours by user and day (a stacked bar chart, uPlot) with the table below."""

from __future__ import annotations

import datetime as dt

from flask import render_template, request

from service.extensions import services
from service.ui.base import bp, ui_owner_id

_DAYS = (7, 30, 90)


@bp.get("/usage")
def usage() -> str:
    """The caller's GPU time (an admin's page: everyone's) over the last ``days`` days, by user and day."""
    days = request.args.get("days", 30, type=int)
    days = days if days in _DAYS else 30
    now = dt.datetime.now(dt.UTC)
    end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    start = end - dt.timedelta(days=days)
    by_user = services().db.usage_by_user_and_day(start, end, owner_id=ui_owner_id(), now=now)
    labels = [(start + dt.timedelta(days=i)).date().isoformat() for i in range(days)]
    users = sorted(by_user)
    hours = {u: [round(by_user[u].get(day, 0.0) / 3600.0, 4) for day in labels] for u in users}
    totals = {u: round(sum(hours[u]), 3) for u in users}
    chart = {"days": labels, "users": users, "hours": [hours[u] for u in users]}
    rows = [(day, {u: hours[u][i] for u in users}) for i, day in enumerate(labels) if any(hours[u][i] for u in users)]
    return render_template(
        "ui/usage.html", chart=chart, users=users, rows=rows[::-1], totals=totals, days=days, choices=_DAYS
    )
