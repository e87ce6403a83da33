"""``gpuyard usage``: GPU time from the jobs' recorded attempts, by user, day or GPU (admins: everyone's)."""

from __future__ import annotations

import csv
import datetime as dt
import re
import sys

import click
from rich.console import Console
from rich.table import Table

from cli.jobs import client_options
from service.client import Client
from store.usage import GROUP_BY

_SINCE = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1)}


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """``30d``, ``12h``, ``2w`` before ``now``, or an ISO 8601 date or time.

    Raises:
        click.BadParameter: neither.
    """
    match = _SINCE.match(text.strip())
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"expected a span such as 30d, 12h, 2w or an ISO 8601 date such as 2026-12-01. Received: {text!r}",
            param_hint="--since",
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@click.command("usage")
@click.option("--since", default="30d", show_default=True, help="How far back: 30d, 12h, 2w, or an ISO 8601 date.")
@click.option("--by", "group_by", type=click.Choice(list(GROUP_BY)), default="user", show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (key,gpu_seconds,gpu_hours,attempts).")
@client_options
def usage_command(client: Client, since: str, group_by: str, as_csv: bool) -> None:
    """GPU time (memory fraction × seconds held) of your jobs, or everyone's for an admin."""
    now = dt.datetime.now(dt.UTC)
    start = parse_since(since, now)
    found = client.usage(start=start.isoformat(), end=now.isoformat(), group_by=group_by)
    rows = found["rows"]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([group_by, "gpu_seconds", "gpu_hours", "attempts"])
        for row in rows:
            writer.writerow([row["key"], f"{row['gpu_seconds']:.3f}", f"{row['gpu_hours']:.6f}", row["attempts"]])
        return
    table = Table(group_by, "GPU-hours", "GPU-seconds", "attempts", title=f"GPU usage since {start:%Y-%m-%d %H:%M} UTC")
    for row in rows:
        table.add_row(row["key"], f"{row['gpu_hours']:.3f}", f"{row['gpu_seconds']:.0f}", str(row["attempts"]))
    Console(highlight=False, soft_wrap=True).print(table)
