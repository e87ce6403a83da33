"""``gpuyard users``: create API users (printing their token once) and list them."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from core.settings import get_settings
from worker.db import Database
from worker.errors import UserExists


def _database() -> Database:
    db = Database(get_settings().database_url)
    db.migrate()
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
    table = Table("id", "name", "admin", "created")
    for user in _database().list_users():
        table.add_row(
            str(user.id), user.name, "yes" if user.is_admin else "", user.created_at.isoformat(" ", "seconds")
        )
    Console().print(table)
