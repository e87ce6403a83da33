"""The schema under Alembic: every released schema version upgrades to head with its data; head equals the
models; processes refuse a database that is behind; ``gpuyard db``. On SQLite and on PostgreSQL
(GPUYARD_TEST_POSTGRES_URL, each test in a fresh schema, skipped when the server cannot be reached)."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError
from support import RELEASED_SCHEMA_VERSIONS, downgrade_schema, rewind_schema

from cli.main import main
from core.settings import Settings
from store import BASE_REVISION, Database, head_revision
from store.errors import SchemaBehind, SchemaError
from store.migrations import VERSION_TABLE, compare_type, is_gpuyard_object, upgrade
from store.tables import Base

POSTGRES_URL = os.environ.get("GPUYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
GiB = 2**30


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database (nothing created yet)."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
        yield database
        database.dispose()
        return
    schema = f"gpuyard_test_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} (set GPUYARD_TEST_POSTGRES_URL): {exc.orig}")
    database = Database(POSTGRES_URL, schema=schema)
    try:
        yield database
    finally:
        database.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _differences(database: Database) -> list[object]:
    with database.engine.connect() as conn:
        opts = {"compare_type": compare_type, "version_table": VERSION_TABLE, "include_name": is_gpuyard_object}
        context = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(context, Base.metadata))


def _tables(database: Database) -> set[str]:
    with database.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


@pytest.mark.parametrize("version", RELEASED_SCHEMA_VERSIONS)
def test_each_released_schema_version_upgrades_to_head_with_its_data(db: Database, version: int) -> None:
    upgrade(db.engine)
    user, token = db.create_user("olduser", is_admin=True)
    dataset, _ = db.add_dataset(user.id, "ab" * 32, 123, {"rows": {"train": 7}}, "datasets/ab/x.h5")
    job = db.create_job(user.id, dataset.id, {"architecture": {"family": "mlp"}}, max_active=10, max_attempts=3)
    db.append_event(job.id, {"event": "epoch", "epoch": 1, "loss": 0.5})
    downgrade_schema(db.engine, BASE_REVISION)
    with db.engine.begin() as conn:  # now it looks like what gpuyard's schema `version` made
        rewind_schema(conn.exec_driver_sql, version)
    assert db.schema_state().legacy_version == version

    with pytest.raises(SchemaBehind, match=f"schema version {version} .*`gpuyard db upgrade`"):
        db.ensure_schema()
    assert db.migrate() == head_revision()

    state = db.schema_state()
    assert (state.revision, state.legacy_version) == (head_revision(), None)
    assert "schema_version" not in _tables(db)
    assert _differences(db) == []
    found = db.user_for_token(token)
    assert found is not None and (found.id, found.name, found.is_admin) == (user.id, "olduser", True)
    assert found.disabled is False and found.max_priority == 0 and found.notify is None
    kept = db.get_job(job.id)
    assert kept is not None and kept.spec == {"architecture": {"family": "mlp"}} and kept.dataset_id == dataset.id
    assert kept.state == "queued" and kept.notify_pending is False and kept.memory_fraction_auto is False
    assert [e.event.get("loss") for e in db.events_since(job.id)][-1:] == [0.5]
    # what the versions after it added works
    db.register_gpu("GPU-test-0", host="h", index=0, name="fake", memory_total_bytes=GiB)
    assert [g.uuid for g in db.list_gpus()] == ["GPU-test-0"]
    assert db.claim_notifications() == []
    assert db.migrate() == head_revision() == db.ensure_schema()  # idempotent


def test_a_fresh_database_is_created_at_head_and_equals_the_models(db: Database) -> None:
    assert db.schema_state().is_empty
    assert db.ensure_schema() == head_revision()
    assert db.schema_state().revision == head_revision()
    assert _differences(db) == []
    assert db.ensure_schema() == head_revision()


def test_processes_starting_together_create_an_empty_database_once(db: Database) -> None:
    results: list[object] = []

    def start() -> None:
        try:
            results.append(Database(db.url, schema=_schema_of(db)).ensure_schema())
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [head_revision()] * 4


def _schema_of(db: Database) -> str | None:
    # The fixture's fresh schema (make_engine passes it in connect_args, not in the URL). Not finding it would
    # send the four processes to the shared database's public schema, whatever another run left there.
    if db.engine.dialect.name != "postgresql":
        return None
    with db.engine.connect() as conn:
        return conn.scalar(text("SELECT current_schema()"))


def test_a_database_from_a_newer_gpuyard_is_refused(db: Database) -> None:
    db.ensure_schema()
    with db.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00d'"))
    with pytest.raises(SchemaError, match="revision f00d, which this code does not know"):
        db.ensure_schema()
    with pytest.raises(SchemaError, match="newer gpuyard"):
        db.migrate()


def test_tables_without_any_version_are_refused(db: Database) -> None:
    db.ensure_schema()
    with db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
    with pytest.raises(SchemaError, match=f"neither a {VERSION_TABLE} nor a schema_version"):
        db.ensure_schema()


def test_a_database_whose_revision_is_in_alembic_version_upgrades_and_optuna_then_shares_it(db: Database) -> None:
    """gpuyard kept its revision in Alembic's default table before Optuna came (0006); Optuna keeps its own
    there. A database made then is recognised, upgraded with its data, and its revision moved over once."""
    import optuna

    upgrade(db.engine)
    user, _ = db.create_user("olduser")
    dataset, _ = db.add_dataset(user.id, "cd" * 32, 123, {"rows": {"train": 7}}, "datasets/cd/x.h5")
    job = db.create_job(user.id, dataset.id, {"architecture": {"family": "mlp"}}, max_active=10, max_attempts=3)
    db.append_event(job.id, {"event": "epoch", "epoch": 1, "loss": 0.25})
    operation = db.create_operation(job.id, user.id, "evaluate", {"split": "test"})
    downgrade_schema(db.engine, BASE_REVISION)
    with db.engine.begin() as conn:  # as the gpuyard of revision 0006 kept it: Alembic's default table
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        conn.execute(
            text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
        )
        conn.execute(text(f"INSERT INTO alembic_version VALUES ('{BASE_REVISION}')"))
    assert db.schema_state().revision == BASE_REVISION
    with pytest.raises(SchemaBehind, match=f"revision {BASE_REVISION}; .*`gpuyard db upgrade`"):
        db.ensure_schema()

    assert db.migrate() == head_revision() == db.ensure_schema()
    assert "alembic_version" not in _tables(db) and VERSION_TABLE in _tables(db)
    assert _differences(db) == []
    kept = db.get_job(job.id)  # SQLite copied the jobs table: no cascade reached its events or operations
    assert kept is not None and kept.study_id is None and kept.trial_number is None
    assert [e.event.get("loss") for e in db.events_since(job.id)][-1:] == [0.25]
    assert db.get_operation(operation.id) is not None

    schema = _schema_of(db)
    kwargs = {"connect_args": {"options": f"-csearch_path={schema}"}} if schema else {}
    storage = optuna.storages.RDBStorage(db.url, engine_kwargs=kwargs)  # no check to skip: its alembic_version
    try:
        study = optuna.create_study(study_name="s", storage=storage)
        study.tell(study.ask(), 1.0)
        assert optuna.load_study(study_name="s", storage=storage).best_value == 1.0
    finally:
        storage.remove_session()
        storage.engine.dispose()
    assert {"studies", "trials", "alembic_version", VERSION_TABLE} <= _tables(db)
    assert _differences(db) == []  # Optuna's tables are not gpuyard's schema
    assert db.schema_state().revision == head_revision() == db.migrate() == db.ensure_schema()


def test_the_api_refuses_to_start_on_a_database_behind(tmp_path: Path) -> None:
    from service.app import create_app

    settings = Settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0")
    old = Database(settings.database_url)
    upgrade(old.engine, BASE_REVISION)
    with old.engine.begin() as conn:
        rewind_schema(conn.exec_driver_sql, 5)
    old.dispose()
    with pytest.raises(SchemaBehind, match="gpuyard db upgrade"):
        create_app({"TESTING": True, "GPUYARD_SETTINGS": settings})


def test_gpuyard_db_upgrade_current_and_history(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old = Database(Settings(data_dir=data_dir).database_url)
    upgrade(old.engine, BASE_REVISION)
    with old.engine.begin() as conn:
        rewind_schema(conn.exec_driver_sql, 4)
    old.dispose()
    runner = CliRunner()
    behind = runner.invoke(main, ["db", "current", "--data-dir", str(data_dir)])
    assert behind.exit_code == 1 and "home-made schema version 4" in behind.output
    assert "gpuyard db upgrade" in behind.output
    upgraded = runner.invoke(main, ["db", "upgrade", "--data-dir", str(data_dir)])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"home-made schema version 4 (before Alembic) -> revision {head_revision()} (head)" in upgraded.output
    current = runner.invoke(main, ["db", "current", "--data-dir", str(data_dir)])
    assert (current.exit_code, current.output) == (0, f"{head_revision()} (head)\n")
    history = runner.invoke(main, ["db", "history"])
    assert history.exit_code == 0 and f"{BASE_REVISION}" in history.output and "(head)" in history.output
    users = runner.invoke(main, ["users", "list"], env={"GPUYARD_DATA_DIR": str(data_dir)})
    assert users.exit_code == 0, users.output


@pytest.mark.parametrize("command", [["janitor", "--once"], ["worker", "--queue", "gpuyard.test"], ["users", "list"]])
def test_workers_janitor_and_admin_commands_refuse_a_database_behind(tmp_path: Path, command: list[str]) -> None:
    from core.settings import get_settings

    data_dir = tmp_path / "data"
    old = Database(Settings(data_dir=data_dir).database_url)
    upgrade(old.engine, BASE_REVISION)
    with old.engine.begin() as conn:
        rewind_schema(conn.exec_driver_sql, 3)
    old.dispose()
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, command, env={"GPUYARD_DATA_DIR": str(data_dir), "GPUYARD_REDIS_URL": ""})
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert "home-made schema version 3" in result.output and "`gpuyard db upgrade`" in result.output
