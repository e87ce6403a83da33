"""Health findings from the trainer's events reach the job record, its event stream, logs -f and status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_helpers import GOOD_SPEC, Tokens, services
from click.testing import CliRunner
from flask import Flask

from cli.main import main
from models.health import health_events
from service.client import Client
from worker.relay import progress_of as _progress_of


def vanishing_findings() -> list[dict[str, Any]]:
    """What the rules say about a 20-layer sigmoid MLP's epoch-0 record (first/last ratio 5e-12)."""
    blocks = {f"dense{i}": {"gradient_norm": 0.1 * 0.25 ** (20 - i), "parameters": 1056} for i in range(1, 21)}
    record = {"epoch": 0, "probe_loss": 2.35, "gradient_norms": {}, "blocks": {**blocks, "output": {
        "gradient_norm": 0.3, "parameters": 330}}}  # fmt: skip
    findings = health_events(record, family="mlp", epoch=0)
    assert [f["kind"] for f in findings] == ["vanishing_gradient"]
    return findings


def store(app: Flask, job_id: str, events: list[dict[str, Any]]) -> None:
    """What the supervisor does with each trainer event: append it, and fold it into last_progress."""
    db = services(app).db
    assert db.take_lease(job_id, "test-owner", 60) is not None
    progress: dict[str, Any] = {}
    for event in events:
        db.append_event(job_id, event)
        if update := _progress_of(event):
            progress.update(update)
            assert db.record_progress(job_id, dict(progress), owner="test-owner")


def test_health_reaches_record_stream_logs_and_status(
    alice: Client, digits_h5: Path, app: Flask, tokens: Tokens, server_url: str
) -> None:
    dataset_id = alice.upload_dataset(digits_h5)["id"]
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    findings = vanishing_findings()
    store(app, job_id, [
        {"event": "state", "state": "running", "attempt": 1, "gpu": "cpu"},
        {"event": "started", "epochs": 2, "backend": "tensorflow"},
        {"event": "health", "epoch": 0, "findings": findings},
        {"event": "epoch_end", "epoch": 1, "epochs": 2, "loss": 2.3, "metrics": {"accuracy": 0.1}},
        {"event": "state", "state": "succeeded"},
    ])  # fmt: skip

    job = alice.job(job_id)
    assert job["health"] == findings
    assert job["health"][0]["remedy"] and job["health"][0]["epoch"] == 0
    assert "health" not in (job["progress"] or {})
    streamed = [e.json() for e in alice.events(job_id) if e.event == "health"]
    assert streamed and streamed[0]["findings"] == findings

    runner = CliRunner()
    follow = runner.invoke(main, ["logs", "-f", job_id, "--url", server_url, "--token", tokens.alice])
    assert "health: vanishing_gradient at epoch 0" in follow.output, follow.output
    assert "remedy: Replace sigmoid/tanh with ReLU" in follow.output
    status = runner.invoke(main, ["status", job_id, "--url", server_url, "--token", tokens.alice])
    assert "vanishing_gradient at epoch 0" in status.output and "remedy:" in status.output, status.output


def test_a_healthy_job_has_no_health(alice: Client, digits_h5: Path, app: Flask) -> None:
    dataset_id = alice.upload_dataset(digits_h5)["id"]
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    store(app, job_id, [{"event": "epoch_end", "epoch": 1, "epochs": 2, "loss": 0.5, "metrics": {}}])
    assert alice.job(job_id)["health"] == []
    assert alice.jobs()[0]["health"] == []


def test_cleared_findings_empty_the_record(alice: Client, digits_h5: Path, app: Flask) -> None:
    dataset_id = alice.upload_dataset(digits_h5)["id"]
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    store(app, job_id, [
        {"event": "health", "epoch": 0, "findings": vanishing_findings()},
        {"event": "health", "epoch": 3, "findings": []},
    ])  # fmt: skip
    assert alice.job(job_id)["health"] == []
