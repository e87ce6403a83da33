"""The job database shared by the API and the workers: users, data sets, jobs, their leases and events.

SQLite (WAL, foreign keys, busy timeout) by default, PostgreSQL by URL (``postgresql+psycopg://``).
Every access goes through :class:`Database` (``database.py``); the rest of the package is its parts::

    tables.py       the ORM tables (User, Dataset, Job, JobEvent, Gpu, DispatchLock, Operation, Study, SchemaVersion)
    migrations.py   append-only schema steps and ``migrate``
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
    SchemaError,
    UnknownDataset,
    UserExists,
)
from store.migrations import LATEST_VERSION, MIGRATIONS
from store.tables import (
    Dataset,
    Gpu,
    Job,
    JobEvent,
    Operation,
    SchemaVersion,
    Study,
    User,
    hash_token,
    new_id,
    utcnow,
)

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
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
    "SchemaError",
    "SchemaVersion",
    "Study",
    "UnknownDataset",
    "User",
    "UserExists",
    "hash_token",
    "make_engine",
    "new_id",
    "utcnow",
]
