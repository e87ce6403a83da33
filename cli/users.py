"""``gpuyard users``: create API users (printing their token once), list, disable, enable them, rotate tokens,
rotate webhook secrets and set default notify URLs."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from core.settings import get_settings
from store import Database
from store.errors import JobDBError, UserExists
from worker.notify import url_problems


def _database() -> Database:
    db = Database(get_settings().database_url)
    try:
        db.ensure_schema()
    except JobDBError as exc:
        raise click.ClickException(str(exc)) from exc
    return db


@click.group("users")
def users() -> None:
    """Manage API users and their bearer tokens."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="The user sees and manages every user's data sets and jobs.")
def create(name: str, admin: bool) -> None:
    """Create user NAME and print its bearer token (shown once; only its hash is stored)."""
    try:
        user, token = _database().create_user(name, is_admin=admin)
    except (UserExists, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created user {user.name!r} (id {user.id}{', admin' if user.is_admin else ''})", err=True)
    click.echo("token (store it now; it cannot be shown again):", err=True)
    click.echo(token)


@users.command("list")
def list_users() -> None:
    """List users (never their tokens)."""
    table = Table("id", "name", "admin", "disabled", "max priority", "created")
    for user in _database().list_users():
        table.add_row(
            str(user.id),
            user.name,
            "yes" if user.is_admin else "",
            "yes" if user.disabled else "",
            str(user.max_priority),
            user.created_at.isoformat(" ", "seconds"),
        )
    Console().print(table)


@users.command("disable")
@click.argument("name")
def disable(name: str) -> None:
    """Disable user NAME: their token is refused (401) from the next request on; data and jobs stay."""
    if _database().set_user_disabled(name, True) is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    click.echo(f"disabled user {name!r}", err=True)


@users.command("enable")
@click.argument("name")
def enable(name: str) -> None:
    """Enable user NAME again: their token works from the next request on."""
    if _database().set_user_disabled(name, False) is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    click.echo(f"enabled user {name!r}", err=True)


@users.command("set-priority")
@click.argument("name")
@click.argument("max_priority", type=click.IntRange(-100, 100))
@click.option(
    "--may-pin/--no-may-pin",
    default=None,
    help="Whether NAME may submit resources.preemptible false (jobs no preemption stops). Unchanged if omitted.",
)
def set_priority(name: str, max_priority: int, may_pin: bool | None) -> None:
    """Let user NAME submit jobs at priorities up to MAX_PRIORITY (default 0; higher goes first)."""
    user = _database().set_max_priority(name, max_priority, may_pin=may_pin)
    if user is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    pin = " and pin jobs against preemption" if user.may_pin else ""
    click.echo(f"user {name!r} may now submit at priority ≤ {max_priority}{pin}", err=True)


@users.command("set-quota")
@click.argument("name")
@click.option(
    "--gpu-hours",
    type=click.FloatRange(min=0),
    default=None,
    help="GPU-hours (memory fraction × hours) per period; omit to remove the quota.",
)
@click.option("--per", "period", type=click.Choice(["week", "month"]), default="month", show_default=True)
def set_quota(name: str, gpu_hours: float | None, period: str) -> None:
    """Give user NAME a GPU-hour quota. Over it, their jobs still run, but only on room nobody else waits
    for, and they are the first victims of a preemption (docs/scheduling.md)."""
    if _database().set_quota(name, gpu_hours, period) is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    if gpu_hours is None:
        click.echo(f"user {name!r} has no GPU-hour quota now", err=True)
    else:
        click.echo(f"user {name!r} may use {gpu_hours:g} GPU-hours per {period}", err=True)


@users.command("rotate-token")
@click.argument("name")
def rotate_token(name: str) -> None:
    """Give user NAME a new token and print it once; the old token stops working at once."""
    rotated = _database().rotate_token(name)
    if rotated is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    click.echo(f"new token for user {name!r} (store it now; it cannot be shown again; the old one is void):", err=True)
    click.echo(rotated[1])


@users.command("webhook-secret")
@click.argument("name")
def webhook_secret(name: str) -> None:
    """Give user NAME a new webhook signing secret and print it once; the old one stops signing at once.

    Webhooks carry X-Gpuyard-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed by this secret>.
    """
    db = _database()
    user = db.user_by_name(name)
    if user is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    secret = db.rotate_webhook_secret(user.id)
    click.echo(f"new webhook secret for user {name!r} (store it now; it is not shown again):", err=True)
    click.echo(secret)


@users.command("notify")
@click.argument("name")
@click.argument("urls", nargs=-1)
@click.option("--clear", is_flag=True, help="Remove the user's default notify URLs.")
def notify(name: str, urls: tuple[str, ...], clear: bool) -> None:
    """Show, set (URLS) or --clear the notify URLs of user NAME's jobs that name none of their own."""
    settings = get_settings()
    db = _database()
    user = db.user_by_name(name)
    if user is None:
        raise click.ClickException(f"no user named {name!r}; 'gpuyard users list' shows them")
    if urls or clear:
        problems = url_problems(list(urls), settings, field="URLS")
        if problems:
            raise click.ClickException("\n".join(f"{p.field}: {p.detail}" for p in problems))
        user = db.set_user_notify(user.id, None if clear else list(urls)) or user
    for url in user.notify or []:
        click.echo(url)
