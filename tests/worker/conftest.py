"""Fixtures of the trainer tests: digits files, full and small (the CPU budget of the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import subset_h5


@pytest.fixture(scope="session")
def small_digits_h5(digits_h5: Path) -> Path:
    """400 training rows and 100 test rows of digits, flat (64 features)."""
    return subset_h5(digits_h5, digits_h5.with_name("digits_small.h5"), train_rows=400, test_rows=100)


@pytest.fixture(scope="session")
def small_digits_image_h5(digits_image_h5: Path) -> Path:
    """400 training rows and 100 test rows of digits as 8×8×1 images."""
    return subset_h5(digits_image_h5, digits_image_h5.with_name("digits_image_small.h5"), train_rows=400, test_rows=100)


# The Celery side's fixtures (private redis-server, job DB + storage, real workers) live in celery_helpers.
from celery_helpers import db, make_job, settings, start_worker, storage  # noqa: E402, F401
