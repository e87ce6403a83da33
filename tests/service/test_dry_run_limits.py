"""The dry run never runs unbounded: a child under RLIMIT_AS, at most N at once per API process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, Tokens, assert_error_body, bearer, upload
from flask import Flask
from flask.testing import FlaskClient

from core.errors import SpecError
from core.hostmem import trainer_memory_limit
from models.data.sandbox import check_file
from models.data.summary import DatasetSummary
from service.app import create_app
from service.checks import trainer_dry_run
from service.extensions import services


@dataclass
class BlockingDryRun:
    """A dry runner that holds its caller until released, so concurrent dry runs can be counted."""

    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self, spec: dict[str, Any], data_path: Path, summary: Any) -> dict[str, Any]:
        self.entered.release()
        assert self.release.wait(30)
        return {"report": {"ok": True, "parameters": None, "layers": []}, "env": {}}


@pytest.fixture
def dry_run() -> BlockingDryRun:  # replaces conftest's FakeDryRun in the app fixture
    return BlockingDryRun()


def test_a_third_concurrent_dry_run_gets_429_with_retry_after(  # type: ignore[no-untyped-def]
    app: Flask, client: FlaskClient, tokens: Tokens, digits_h5: Path, dry_run: BlockingDryRun, settings
) -> None:
    assert settings.dry_run_concurrency == 2
    dataset = upload(client, tokens.alice, digits_h5).get_json()["id"]
    body = {"dataset": dataset, "spec": GOOD_SPEC}
    statuses: list[int] = []

    def submit() -> None:
        response = app.test_client().post("/v1/jobs?dry_run=1", json=body, headers=bearer(tokens.alice))
        statuses.append(response.status_code)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert dry_run.entered.acquire(timeout=30) and dry_run.entered.acquire(timeout=30)
        refused = client.post("/v1/jobs?dry_run=1", json=body, headers=bearer(tokens.alice))
        error = assert_error_body(refused, 429, "too_many_dry_runs")
        assert refused.headers["Retry-After"].isdigit()
        assert "GPUYARD_DRY_RUN_CONCURRENCY=2" in error["detail"]
    finally:
        dry_run.release.set()
        for thread in threads:
            thread.join(30)
    assert statuses == [200, 200]
    assert client.post("/v1/jobs?dry_run=1", json=body, headers=bearer(tokens.alice)).status_code == 200  # freed


@pytest.fixture(scope="module")
def digits_summary(digits_h5: Path) -> DatasetSummary:
    return check_file(digits_h5)


@pytest.mark.slow
def test_a_dry_run_past_its_memory_limit_is_a_spec_error_naming_the_limit(
    digits_h5: Path, digits_summary: DatasetSummary
) -> None:
    # 3 highway blocks of width 12000: 864 M parameters, 3.5 GB of weights, under a 2.5 GiB limit.
    spec = {"architecture": {"family": "highway", "depth": 3, "width": 12000}}
    limit = 5 * 2**29
    with pytest.raises(SpecError) as caught:
        trainer_dry_run(spec, digits_h5, digits_summary, timeout_s=120, memory_bytes=limit)
    [problem] = caught.value.problems
    assert problem.code == "dry_run_out_of_memory"
    assert f"{limit:,} bytes" in problem.detail and "GPUYARD_DRY_RUN_MEMORY_BYTES" in problem.detail


@pytest.mark.slow
def test_an_example_dry_run_passes_under_the_default_memory_limit(  # type: ignore[no-untyped-def]
    digits_h5: Path, digits_summary: DatasetSummary, settings
) -> None:
    spec = {"architecture": {"family": "highway", "depth": 2, "width": 64}}
    result = trainer_dry_run(
        spec, digits_h5, digits_summary, timeout_s=120, memory_bytes=settings.dry_run_memory_bytes
    )
    assert result["report"]["ok"] is True and result["report"]["parameters"]["total"] > 0


@pytest.mark.slow
def test_a_dry_run_past_a_trainers_host_memory_limit_is_killed_and_named(
    digits_h5: Path, digits_summary: DatasetSummary
) -> None:
    """The dry-run child is watched as a trainer is (RSS of its process group, core.hostmem's limit)."""
    spec = {"architecture": {"family": "highway", "depth": 2, "width": 64}}
    limit = 100 * 2**20  # importing the framework alone takes more
    with pytest.raises(SpecError) as caught:
        trainer_dry_run(spec, digits_h5, digits_summary, timeout_s=120, host_memory_bytes=limit)
    [problem] = caught.value.problems
    assert problem.code == "dry_run_out_of_memory"
    assert f"{limit:,} bytes" in problem.detail and "GPUYARD_TRAINER_MEMORY_BYTES" in problem.detail


def test_the_api_gives_the_dry_run_a_trainers_host_memory_limit(settings, queue) -> None:  # type: ignore[no-untyped-def]
    app = create_app(
        {"TESTING": True, "GPUYARD_SETTINGS": settings, "GPUYARD_JOB_QUEUE": queue, "GPUYARD_OPERATION_QUEUE": queue}
    )  # no GPUYARD_DRY_RUNNER: the real one
    with app.app_context():
        runner = services().dry_run.runner
    assert runner.keywords["host_memory_bytes"] == trainer_memory_limit(settings)  # type: ignore[attr-defined]
