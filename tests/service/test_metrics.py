"""GET /metrics: Prometheus' text format, with series that follow the jobs and the GPUs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from api_helpers import Tokens, services
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from store import Database
from worker.gpus import fake_uuid

SPEC = {"architecture": {"family": "mlp", "widths": [8]}, "resources": {"gpu": "cpu"}}


def samples(client: FlaskClient, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_jobs_queue_and_durations_follow_the_job_db(client: FlaskClient, tokens: Tokens, app: Flask) -> None:
    db: Database = services(app).db
    alice = db.user_for_token(tokens.alice)
    dataset, _ = db.add_dataset(alice.id, "c" * 64, 1, {}, "datasets/cc/x.h5")
    before = samples(client)
    assert before[("gpuyard_jobs", (("state", "queued"),))] == 0
    job = db.create_job(alice.id, dataset.id, SPEC, max_active=10, max_attempts=1)
    queued = samples(client)
    assert queued[("gpuyard_jobs", (("state", "queued"),))] == 1 and queued[("gpuyard_queue_length", ())] == 1
    db.take_lease(job.id, "test-worker", 60, gpu="cpu")
    db.record_progress(job.id, {"samples_per_s": 1234.5})
    running = samples(client, headers={"Authorization": f"Bearer {tokens.admin}"})
    assert running[("gpuyard_jobs", (("state", "running"),))] == 1
    assert running[("gpuyard_job_samples_per_second", (("job", job.id),))] == 1234.5
    assert running[("gpuyard_samples_per_second", ())] == 1234.5
    assert running[("gpuyard_queue_wait_seconds_count", ())] == 1
    db.finish_job(job.id, "test-worker", "succeeded")
    done = samples(client)
    assert done[("gpuyard_jobs", (("state", "succeeded"),))] == 1
    assert done[("gpuyard_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    # the API's own latency, by route rule
    assert any(name == "gpuyard_http_request_duration_seconds_count" and dict(labels).get("route") == "/metrics"
               for name, labels in done)  # fmt: skip


def test_per_gpu_series_from_the_heartbeats(app: Flask, beats: dict[str, dict[str, Any]]) -> None:
    beats[fake_uuid(0)] = {"memory_total_bytes": 16 * 2**30, "memory_used_bytes": 3 * 2**30,
                           "utilization_percent": 40, "host": "box", "slots": 4, "time": 0.0}  # fmt: skip
    db = services(app).db
    for index in (0, 1):
        db.register_gpu(fake_uuid(index), host="box", index=index, name="Fake", memory_total_bytes=16 * 2**30)
    found = samples(app.test_client())
    online = {"uuid": fake_uuid(0), "index": "0", "host": "box"}
    offline = {"uuid": fake_uuid(1), "index": "1", "host": "box"}
    key = lambda name, labels: (name, tuple(sorted(labels.items())))  # noqa: E731
    assert found[key("gpuyard_gpu_online", online)] == 1 and found[key("gpuyard_gpu_online", offline)] == 0
    assert found[key("gpuyard_gpu_memory_used_bytes", online)] == 3 * 2**30
    assert found[key("gpuyard_gpu_utilization_percent", online)] == 40
    assert found[key("gpuyard_gpu_jobs_running", online)] == 0


def test_other_hosts_need_the_metrics_token(app: Flask, settings: Settings) -> None:
    client = app.test_client()
    far = {"environ_base": {"REMOTE_ADDR": "203.0.113.7"}}
    assert client.get("/metrics", **far).status_code == 403
    services(app).settings = settings.model_copy(update={"metrics_token": "s3cret"})
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}, **far).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}, **far).status_code == 403


def test_an_anonymous_scrape_gets_no_job_ids_and_a_privileged_one_does(
    app: Flask, settings: Settings, tokens: Tokens
) -> None:
    db: Database = services(app).db
    alice = db.user_for_token(tokens.alice)
    dataset, _ = db.add_dataset(alice.id, "d" * 64, 1, {}, "datasets/dd/x.h5")
    job = db.create_job(alice.id, dataset.id, SPEC, max_active=10, max_attempts=1)
    db.take_lease(job.id, "test-worker", 60, gpu="cpu")
    db.record_progress(job.id, {"samples_per_s": 100.0})
    client = app.test_client()
    anonymous = client.get("/metrics").get_data(as_text=True)
    assert job.id not in anonymous and "gpuyard_job_samples_per_second" not in anonymous
    assert 'job="' not in anonymous and "alice" not in anonymous
    assert samples(client)[("gpuyard_samples_per_second", ())] == 100.0
    services(app).settings = settings.model_copy(update={"metrics_token": "s3cret"})
    far = {"environ_base": {"REMOTE_ADDR": "203.0.113.7"}}
    for token in ("s3cret", tokens.admin):
        privileged = client.get("/metrics", headers={"Authorization": f"Bearer {token}"}, **far)
        assert privileged.status_code == 200 and f'job="{job.id}"' in privileged.get_data(as_text=True)
    for token in (tokens.alice, "nope"):  # a user's token is no key to everyone's jobs, even from loopback
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    db.set_user_disabled("root", True)
    assert client.get("/metrics", headers={"Authorization": f"Bearer {tokens.admin}"}, **far).status_code == 403


def test_the_grafana_dashboard_plots_only_series_gpuyard_exports(client: FlaskClient) -> None:
    """Every gpuyard_* name in deploy/grafana/gpuyard.json is a series GET /metrics exposes."""
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "gpuyard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"gpuyard_[a-z_]+", target["expr"])}  # fmt: skip
    exported = {name for name, _labels in samples(client)}
    text = client.get("/metrics").get_data(as_text=True)
    exported |= {family.name for family in text_string_to_metric_families(text)}
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}  # a histogram's series, by family
    assert used and used <= exported, sorted(used - exported)
