"""A real job, supervised end to end: its health findings land in the job record and the stored event stream.

The issue's acceptance check: a 20-layer sigmoid MLP job carries ``vanishing_gradient`` at epoch 0 with a
remedy; the Highway example's job carries no health event; a finding named in ``training.stop_on`` fails
the job with reason ``unhealthy``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from celery_helpers import events_of

from core.exitcodes import ExitCode
from core.settings import Settings
from core.states import FAILED, SUCCEEDED
from store import Database
from worker.outcome import classify_exit
from worker.storage import LocalStorage
from worker.supervisor import supervise

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "specs"


@pytest.mark.slow
def test_deep_sigmoid_job_carries_vanishing_gradient_and_highway_nothing(
    settings: Settings, db: Database, storage: LocalStorage, make_job: Callable[..., str]
) -> None:
    sigmoid = make_job({
        "name": "deep sigmoid",
        "architecture": {"family": "mlp", "widths": [32] * 20, "activation": "sigmoid",
                         "input_normalization": "standardize"},
        "training": {"epochs": 1, "batch_size": 128, "optimizer": {"name": "sgd", "learning_rate": 0.01}},
        "resources": {"gpu": "cpu"},
    })  # fmt: skip
    highway_example = json.loads((EXAMPLES / "highway.json").read_text())
    highway_example["training"] = {**highway_example["training"], "epochs": 1}
    highway_example["resources"] = {"gpu": "cpu"}
    highway = make_job(highway_example)

    assert supervise(sigmoid, settings, db=db, storage=storage).state == SUCCEEDED
    (event,) = events_of(db, sigmoid, "health")
    assert event["epoch"] == 0
    (finding,) = event["findings"]
    assert finding["kind"] == "vanishing_gradient" and finding["epoch"] == 0 and finding["value"] < 1e-3
    assert "residual" in finding["remedy"]
    assert db.get_job(sigmoid).last_progress["health"] == event["findings"]

    assert supervise(highway, settings, db=db, storage=storage).state == SUCCEEDED
    assert events_of(db, highway, "health") == []
    assert "health" not in db.get_job(highway).last_progress


def test_an_unhealthy_exit_is_the_jobs_fault() -> None:
    detail = "stopped at epoch 1 on loss_not_finite (training.stop_on): ..."
    state, reason, shown = classify_exit(int(ExitCode.UNHEALTHY), None, {"event": "failed", "detail": detail})
    assert (state, reason, shown) == (FAILED, "unhealthy", detail)
