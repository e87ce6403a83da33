"""Small helpers every test package imports (``from support import free_port, wait_for``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate`` until it is truthy; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


# The columns each schema version after 2 adds (store/migrations.py), newest last: what a test drops to
# make a fresh database look like an older one.
_COLUMNS_ADDED = {
    3: [("users", "disabled")],
    4: [
        ("users", "max_priority"),
        ("jobs", "queue_position"),
        ("jobs", "waiting_reason"),
        ("jobs", "estimated_start_at"),
        ("jobs", "memory_fraction_auto"),
        ("jobs", "suggested_memory_fraction"),
    ],
    5: [("users", "webhook_secret"), ("users", "notify"), ("jobs", "notify"), ("jobs", "notify_pending")],
    6: [],
    7: [],  # the studies' version (another branch)
    8: [
        ("users", "may_pin"),
        ("users", "quota_gpu_hours"),
        ("users", "quota_period"),
        ("jobs", "preemptions"),
        ("jobs", "preempted_by"),
        ("jobs", "preempted_at"),
    ],
}
_TABLES_ADDED = {6: ["operations"], 8: ["job_attempts"]}


def rewind_schema(execute: Callable[[str], object], version: int) -> None:
    """Make a migrated SQLite database look like schema ``version`` (≥ 2): drop later versions' columns
    and stamp it. ``execute`` runs one SQL statement (a DB-API cursor's or ``exec_driver_sql``)."""
    for added in range(version + 1, max(_COLUMNS_ADDED) + 1):
        for table, column in _COLUMNS_ADDED[added]:
            execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        for table in _TABLES_ADDED.get(added, ()):
            execute(f"DROP TABLE {table}")
    execute("DELETE FROM schema_version")
    execute(f"INSERT INTO schema_version VALUES ({version}, 'v{version}', '2026-01-01 00:00:00')")
