"""The service's long-lived parts (settings, job DB, storage, queue, checkers), built once per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from flask_wtf.csrf import CSRFProtect

from core.settings import Settings
from models.data.summary import DataKeys, DatasetSummary
from service.queue import JobQueue
from worker.db import Database
from worker.dispatch import HeartbeatSource
from worker.storage import Storage

EXTENSION_KEY = "gpuyard"

csrf = CSRFProtect()
"""CSRF tokens of the dashboard's forms (checked by service.ui; the API checks them for cookie callers)."""

DatasetChecker = Callable[[Path, DataKeys], DatasetSummary]
"""Validates an uploaded HDF5 file; raises core.errors.DataError listing every reason."""

DryRunner = Callable[[dict[str, Any], Path], dict[str, Any]]
"""Dry-runs a validated spec against a stored data set; returns the summary, raises SpecError/DataError."""


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: Storage
    queue: JobQueue
    check_dataset: DatasetChecker
    dry_run: DryRunner
    heartbeats: HeartbeatSource
    """The workers' GPU heartbeats by uuid (Redis; tests substitute a dict)."""


def init_services(app: Flask, services: Services) -> None:
    app.extensions[EXTENSION_KEY] = services


def services() -> Services:
    """The current app's services."""
    return current_app.extensions[EXTENSION_KEY]
