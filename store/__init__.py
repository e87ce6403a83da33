"""The job database shared by the API and the workers: users, data sets, jobs, their leases and events.

SQLite (WAL, foreign keys, busy timeout) by default, PostgreSQL by URL (``postgresql+psycopg://``).
Every access goes through :class:`Database` (``database.py``); the rest of the package is its parts::

    tables.py       the ORM tables (User, Dataset, Job, JobEvent, Gpu, DispatchLock, Operation)
    migrations.py   the schema, owned by Alembic (alembic/versions/, one revision per change)
    legacy.py       the home-made steps of the pre-Alembic ``schema_version`` (1-6), run once by ``upgrade``
    engine.py       ``make_engine``: SQLite pragmas, PostgreSQL search path
    database.py     ``Database``: one short transaction per method, guarded UPDATEs for every race

Job states (``core.states``)::

    queued ──dispatch──▶ queued+dispatched ──take_lease──▶ running ──finish_job──▶ succeeded | failed | ...
      ▲   (gpu, dispatched_at set)                           │
      └──requeue_expired / requeue_job (gpu, dispatched_at cleared)──┘

The refusals (``JobDBError`` and its kin) live in ``worker/errors.py``.
"""

from __future__ import annotations

from store.database import Database, DispatchTxn, JanitorReport, JobPage, MetricsSnapshot
from store.engine import make_engine
from store.errors import (
    ActiveJobLimit,
    DatabaseUnavailable,
    DatasetInUse,
    JobDBError,
    SchemaBehind,
    SchemaError,
    UnknownDataset,
    UserExists,
)
from store.migrations import BASE_REVISION, head_revision
from store.tables import (
    Dataset,
    Gpu,
    Job,
    JobEvent,
    Operation,
    User,
    hash_token,
    new_id,
    utcnow,
)

__all__ = [
    "BASE_REVISION",
    "ActiveJobLimit",
    "Database",
    "DatabaseUnavailable",
    "Dataset",
    "DatasetInUse",
    "DispatchTxn",
    "Gpu",
    "JanitorReport",
    "Job",
    "JobDBError",
    "JobEvent",
    "JobPage",
    "MetricsSnapshot",
    "Operation",
    "SchemaBehind",
    "SchemaError",
    "UnknownDataset",
    "User",
    "UserExists",
    "hash_token",
    "head_revision",
    "make_engine",
    "new_id",
    "utcnow",
]
