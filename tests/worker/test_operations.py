"""The worker side of model operations (worker/operations.py): idempotent start, and the ways one fails
without a trained model (no TensorFlow start here but one, killed by the time limit: about 2-5 s in all)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from celery_helpers import highway_spec

from core.names import MODEL_H5
from core.settings import Settings
from core.states import FAILED, RUNNING
from store import Database
from worker.operations import OPERATION_LOG, run_operation
from worker.storage import LocalStorage, operation_dir


def _operation(db: Database, make_job: Callable[..., str], kind: str = "export") -> tuple[str, str]:
    job_id = make_job(highway_spec())
    job = db.get_job(job_id)
    assert job is not None
    return job_id, db.create_operation(job_id, job.owner_id, kind, {"formats": ["onnx"]}).id


def test_an_operation_runs_once_and_fails_clearly_without_a_model(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    _job_id, op_id = _operation(db, make_job)
    assert run_operation(op_id, settings, db=db, storage=storage) == {
        "operation": op_id,
        "ran": True,
        "reason": "model_missing",
    }
    operation = db.get_operation(op_id)
    assert operation is not None and operation.state == FAILED and operation.error_reason == "model_missing"
    assert MODEL_H5 in (operation.error_detail or "")
    # A second delivery of the same task finds it over and does nothing.
    assert run_operation(op_id, settings, db=db, storage=storage) == {"operation": op_id, "ran": False}


def test_a_second_delivery_of_a_running_operation_does_nothing(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    _job_id, op_id = _operation(db, make_job)
    started = db.start_operation(op_id)
    assert started is not None and started.state == RUNNING
    assert run_operation(op_id, settings, db=db, storage=storage)["ran"] is False
    assert db.get_operation(op_id).state == RUNNING  # type: ignore[union-attr]


def test_an_operation_past_its_time_limit_is_stopped(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str], tmp_path: Path
) -> None:
    job_id, op_id = _operation(db, make_job)
    model = storage.local_path(storage.job_key(job_id, MODEL_H5))
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"not loaded: the child is stopped while TensorFlow starts")
    quick = settings.model_copy(update={"operation_timeout_s": 0.5})
    assert run_operation(op_id, quick, db=db, storage=storage)["reason"] == "operation_time_limit"
    operation = db.get_operation(op_id)
    assert operation is not None and operation.state == FAILED
    assert "operation_timeout_s" in (operation.error_detail or "")
    assert (operation_dir(storage, job_id, op_id) / OPERATION_LOG).is_file()
