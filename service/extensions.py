"""The service's long-lived parts (settings, job DB, storage, queue, checkers), built once per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, current_app
from flask_wtf.csrf import CSRFProtect

from core.settings import Settings
from service.streams import EventHub, StreamSlots
from store import Database
from worker.heartbeat import HeartbeatSource
from worker.queues import Sender
from worker.storage import Storage
from worker.submit import DatasetChecker, DryRunner

EXTENSION_KEY = "gpuyard"

csrf = CSRFProtect()
"""CSRF tokens of the dashboard's forms (checked by service.ui; the API checks them for cookie callers)."""

# DatasetChecker validates an uploaded HDF5 file (path, keys, its sha256 when known), raising DataError with
# every reason; DryRunner dry-runs a checked spec against a stored data set, raising SpecError/DataError.


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: Storage
    send: Sender
    """Puts gpuyard.train(job_id) on a queue (Celery; tests substitute a recorder)."""
    check_dataset: DatasetChecker
    dry_run: DryRunner
    heartbeats: HeartbeatSource
    """The workers' GPU heartbeats by uuid (Redis; tests substitute a dict)."""
    hub: EventHub
    """Wakes this process's event streams when their job publishes (service/streams.py)."""
    stream_slots: StreamSlots
    """Counts each user's open event streams across processes."""
    send_operation: Sender
    """Puts gpuyard.operate(op_id) on a queue (Celery; tests substitute one that runs it)."""
    wake: Callable[[str], None] = lambda job_id: None
    """Tells a job's event streams to look at the DB (Redis pub/sub; the dispatcher's queue events)."""


def init_services(app: Flask, services: Services) -> None:
    app.extensions[EXTENSION_KEY] = services


def services() -> Services:
    """The current app's services."""
    return current_app.extensions[EXTENSION_KEY]
