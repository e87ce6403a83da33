"""The job store's one entry point, :class:`Database`: every read and write the API and workers make.

Every public method is one short transaction. Methods that two workers may race on (``take_lease``,
``requeue_expired``, ``finish_job``, ...) decide with a single guarded ``UPDATE ... WHERE <expected state>``
and look at its row count, which is atomic on both engines; PostgreSQL additionally locks the row first
with ``SELECT ... FOR UPDATE``. On SQLite the first statement of every writing transaction is a write, so
it takes the write lock (waiting out the busy timeout) instead of failing to upgrade a read snapshot.

The methods live with their aggregate, one module each (users, datasets, jobs, notifications, dispatch,
gpus, metrics, operations, studies, usage), all on :class:`store.base.StoreBase`; this class composes them.
"""

from __future__ import annotations

from store.datasets import DatasetsStore
from store.dispatch import DispatchStore, DispatchTxn
from store.gpus import GpusStore
from store.jobs import JanitorReport, JobPage, JobsStore
from store.metrics import MetricsSnapshot, MetricsStore
from store.notifications import NotificationsStore
from store.operations import OperationsStore
from store.studies import StudiesStore
from store.usage import UsageStore
from store.users import UsersStore

__all__ = ["Database", "DispatchTxn", "JanitorReport", "JobPage", "MetricsSnapshot"]


class Database(
    UsersStore,
    DatasetsStore,
    JobsStore,
    NotificationsStore,
    DispatchStore,
    GpusStore,
    MetricsStore,
    OperationsStore,
    StudiesStore,
    UsageStore,
):
    """The job database. One per process; thread-safe (each method opens its own session).

    Args:
        url: SQLAlchemy URL (see :func:`store.engine.make_engine`).
        schema: PostgreSQL schema to work in (default: the server's search path).
    """
