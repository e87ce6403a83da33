"""Prometheus metrics: what the job DB and the GPU heartbeats say at scrape time, and the API's latency.

Two sources, one registry per scrape:

* :class:`StateCollector` reads the job DB and the workers' heartbeats when Prometheus scrapes, so every
  API process answers the same figures: jobs by state, the queue, queue waits and job durations (the last
  ``WINDOW_S``), samples/s of running jobs (in all; per job only for a privileged scrape, since job ids
  belong to users), per GPU its memory, utilisation, jobs and whether it is online, GPU-seconds
  (``gpuyard_gpu_seconds_total``: by user for a privileged scrape, in all otherwise) and preemptions
  (``gpuyard_preemptions_total``).
* ``gpuyard_http_request_duration_seconds`` (by route, method and status) is observed in each process.
  Under gunicorn several processes answer: with ``PROMETHEUS_MULTIPROC_DIR`` set (``gpuyard up`` and the
  container set it), prometheus-client's multiprocess mode sums them; without it, a scrape sees only the
  process that answered it.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from core.states import JOB_STATES
from store import Database
from worker.heartbeat import HeartbeatSource
from worker.placement import gpu_views

#: Seconds of history the wait and duration histograms summarise.
WINDOW_S = 24 * 3600
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)
DURATION_BUCKETS = (10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)

REQUEST_SECONDS = Histogram(
    "gpuyard_http_request_duration_seconds",
    "Seconds the API took to answer a request (streams: until their headers).",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def _histogram(name: str, documentation: str, values: dict[str, list[float]], label: str, buckets: tuple) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for key, observed in values.items():
        counts = [sum(1 for v in observed if v <= bound) for bound in buckets]
        family.add_metric(
            [key] if label else [],
            [(str(float(b)), float(c)) for b, c in zip(buckets, counts, strict=True)]
            + [("+Inf", float(len(observed)))],
            sum(observed),
        )
    return family


class StateCollector:
    """Prometheus collector of gpuyard's state, read from the job DB and the heartbeats at each scrape."""

    def __init__(self, db: Database, heartbeats: HeartbeatSource, *, per_job: bool = False) -> None:
        self.db, self.heartbeats, self.per_job = db, heartbeats, per_job

    def collect(self) -> Iterator[Metric]:
        now = dt.datetime.now(dt.UTC)
        snapshot = self.db.metrics_snapshot(now - dt.timedelta(seconds=WINDOW_S))
        jobs = GaugeMetricFamily("gpuyard_jobs", "Jobs by state.", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], snapshot.by_state.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("gpuyard_queue_length", "Queued jobs not yet placed on a GPU.", value=snapshot.waiting)
        yield _histogram(
            "gpuyard_queue_wait_seconds",
            f"Seconds from submit to start, jobs started in the last {WINDOW_S // 3600} h.",
            {"": snapshot.waits} if snapshot.waits else {"": []},
            "",
            WAIT_BUCKETS,
        )
        yield _histogram(
            "gpuyard_job_duration_seconds",
            f"Seconds from start to end by outcome, jobs finished in the last {WINDOW_S // 3600} h.",
            snapshot.durations,
            "outcome",
            DURATION_BUCKETS,
        )
        yield GaugeMetricFamily(
            "gpuyard_samples_per_second",
            "Training throughput of all running jobs together.",
            value=sum(snapshot.samples_per_s.values()),
        )
        if self.per_job:  # job ids are users' data: only for the metrics token or an admin
            rate = GaugeMetricFamily(
                "gpuyard_job_samples_per_second", "Training throughput of each running job.", labels=["job"]
            )
            for job_id, samples in snapshot.samples_per_s.items():
                rate.add_metric([job_id], samples)
            yield rate
        labels = ["uuid", "index", "host"]
        families = {
            "online": GaugeMetricFamily("gpuyard_gpu_online", "1 while its worker sends heartbeats.", labels=labels),
            "total": GaugeMetricFamily("gpuyard_gpu_memory_total_bytes", "The GPU's memory.", labels=labels),
            "used": GaugeMetricFamily("gpuyard_gpu_memory_used_bytes", "Memory in use (NVML).", labels=labels),
            "util": GaugeMetricFamily("gpuyard_gpu_utilization_percent", "Utilisation (NVML).", labels=labels),
            "jobs": GaugeMetricFamily("gpuyard_gpu_jobs_running", "gpuyard jobs running on the GPU.", labels=labels),
        }
        for view in gpu_views(self.db, self.heartbeats):
            key = [view.uuid, str(view.index), view.host]
            families["online"].add_metric(key, 1.0 if view.online else 0.0)
            families["total"].add_metric(key, view.memory_total_bytes)
            if view.memory_used_bytes is not None:
                families["used"].add_metric(key, view.memory_used_bytes)
            if view.utilization_percent is not None:
                families["util"].add_metric(key, view.utilization_percent)
            families["jobs"].add_metric(key, snapshot.running_by_gpu.get(view.uuid, 0))
        yield from families.values()
        by_user = self.db.gpu_seconds_by_user(now)
        help_text = "GPU time used (memory fraction × seconds), from the jobs' attempts."
        if self.per_job:  # user names are for a privileged scrape, like job ids
            used = CounterMetricFamily("gpuyard_gpu_seconds", help_text, labels=["user"])
            for user, seconds in sorted(by_user.items()):
                used.add_metric([user], seconds)
        else:
            used = CounterMetricFamily("gpuyard_gpu_seconds", help_text, value=sum(by_user.values()))
        yield used
        yield CounterMetricFamily(
            "gpuyard_preemptions", "Jobs stopped for a higher-priority job.", value=self.db.preemptions_total()
        )


def scrape(db: Database, heartbeats: HeartbeatSource, *, per_job: bool = False) -> bytes:
    """The text exposition of every metric, for one scrape; series labelled by job only with ``per_job``."""
    registry = CollectorRegistry()
    registry.register(StateCollector(db, heartbeats, per_job=per_job))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REQUEST_SECONDS)
    return generate_latest(registry)


def observe_requests(app: Flask) -> None:
    """Time every request into ``gpuyard_http_request_duration_seconds`` (by route rule, not raw path)."""

    @app.before_request
    def _start() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.pop("request_started", None)
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            REQUEST_SECONDS.labels(route, request.method, str(response.status_code)).observe(
                time.perf_counter() - started
            )
        return response
