"""``gpuyard db``: the job database's schema (Alembic): upgrade it, show where it stands and its history."""

from __future__ import annotations

from pathlib import Path

import click

from core.settings import Settings, get_settings
from store import Database
from store.errors import JobDBError
from store.migrations import head_revision, script_directory

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The local stack's data directory (as `gpuyard up --data-dir`); default: GPUYARD_DATA_DIR.",
)


def _database(data_dir: Path | None) -> Database:
    settings = Settings(data_dir=data_dir) if data_dir is not None else get_settings()
    return Database(settings.database_url)


@click.group("db")
def db() -> None:
    """The job database's schema: `upgrade` after installing a new gpuyard, `current`, `history`.

    The database is GPUYARD_DATABASE_URL (default: SQLite in GPUYARD_DATA_DIR). Back it up before upgrading.
    """


@db.command("upgrade")
@_DATA_DIR
def upgrade(data_dir: Path | None) -> None:
    """Bring the schema to this gpuyard's head revision (from any earlier gpuyard's, or from empty)."""
    database = _database(data_dir)
    try:
        before = database.schema_state().describe()
        now = database.migrate()
    except JobDBError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        database.dispose()
    click.echo(f"{database.engine.url.render_as_string(hide_password=True)}: {before} -> revision {now} (head)")


@db.command("current")
@_DATA_DIR
def current(data_dir: Path | None) -> None:
    """Print the database's revision, and whether it is this gpuyard's head. Exit status 1 when behind."""
    database = _database(data_dir)
    try:
        state = database.schema_state()
    except JobDBError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        database.dispose()
    head = head_revision()
    if state.revision == head:
        click.echo(f"{head} (head)")
        return
    click.echo(f"{state.describe()}; head is {head}: run `gpuyard db upgrade`")
    raise SystemExit(1)


@db.command("history")
def history() -> None:
    """List the schema's revisions, newest first."""
    head = head_revision()
    for script in script_directory().walk_revisions():
        mark = " (head)" if script.revision == head else ""
        click.echo(f"{script.revision}{mark}  {script.doc}")
