"""Alembic's environment for the job database (store/migrations.py builds the configuration in code).

``gpuyard db upgrade`` hands over its connection, already inside the transaction that holds the migration
lock. Run from Alembic's own CLI (``alembic -c alembic.ini ...`` at the repository root), it connects to
``sqlalchemy.url`` or, when that is unset, to the settings' ``GPUYARD_DATABASE_URL``.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from core.settings import get_settings
from store.engine import make_engine
from store.migrations import compare_type
from store.tables import Base, UTCDateTime

config = context.config


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Revisions must not import the models: our UTCDateTime is stored as a plain DateTime.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters a table by copying it: autogenerate writes batch operations
        render_item=_render_item,
        compare_type=compare_type,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or get_settings().database_url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("gpuyard's migrations run online only (`gpuyard db upgrade`)")
run_migrations_online()
