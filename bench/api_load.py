"""API load bench (CPU): GET throughput and latency, submit → trainer-started latency, large-upload cost.

Starts a private local stack (``service.stack``: Redis, gunicorn, one CPU worker, janitor) in a temporary
directory, or uses a running one (``--url``/``--token``, ``--redis-url``), and measures, each against a
bare baseline measured in the same run on the same machine:

* ``GET /v1/jobs/<id>`` with N client threads for a bounded time: requests/s, p50/p99 latency
  (baseline: ``GET /v1/health``, which touches neither the token table nor the job DB);
* submit → trainer ``started``: from ``POST /v1/jobs`` to the trainer's ``started`` event (the time it
  stamps), split at the worker's ``running`` state event (baseline: a no-op Celery task's round trip on the
  same Redis, prefork, median);
* one large upload (``--upload-mib``, 1024 by default): MiB/s to the 201, and the peak RSS growth of the
  gunicorn worker processes while it streams (baseline: sha256 + copy of the same file on local disk).

It talks only to 127.0.0.1 and ends by itself (every wait is bounded; ``--max-seconds`` is a hard stop).

    .venv/bin/python bench/api_load.py --upload-mib 64 --duration 5       # quick
    .venv/bin/python bench/api_load.py                                    # full (1 GiB upload)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import h5py
import numpy as np
import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.states import RUNNING  # noqa: E402
from models.data.digits import write_digits_h5  # noqa: E402
from service.client import Client, ClientError  # noqa: E402
from service.stack import Stack, StackConfig, free_port  # noqa: E402

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ── the bare Celery baseline ──────────────────────────────────────────────────────────────────────────
def noop_celery(redis_url: str) -> Any:
    from celery import Celery

    app = Celery("bench", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1)

    @app.task(name=NOOP_TASK)
    def noop() -> int:
        return 1

    return app


def run_noop_worker(redis_url: str) -> None:
    """The baseline's worker (this script run with --celery-worker): prefork, one process, no-op task."""
    noop_celery(redis_url).worker_main(
        ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", NOOP_QUEUE,
         "--hostname", f"bench-noop-{os.getpid()}@localhost", "--loglevel", "WARNING", "--without-mingle",
         "--without-gossip"]
    )  # fmt: skip


def celery_round_trips(redis_url: str, rounds: int, log_dir: Path) -> list[float]:
    """Seconds from send_task to the result of a no-op task, ``rounds`` times (after a warm-up)."""
    app = noop_celery(redis_url)
    with (log_dir / "noop-worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--celery-worker", redis_url],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        for _ in range(5):  # warm-up; the first waits for the worker to come up
            app.send_task(NOOP_TASK, queue=NOOP_QUEUE).get(timeout=60)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            app.send_task(NOOP_TASK, queue=NOOP_QUEUE).get(timeout=10)
            times.append(time.perf_counter() - started)
        return times
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        app.close()


# ── measurements ──────────────────────────────────────────────────────────────────────────────────────
def load(
    url: str, path: str, token: str | None, threads: int, duration_s: float, *, conditional: bool = False
) -> dict[str, float]:
    """``threads`` clients GET ``path`` back to back for ``duration_s``: req/s, p50, p99 (ms), errors.

    ``conditional``: each client sends the ``ETag`` of its first answer back in ``If-None-Match``, as a
    poller does, and expects ``304 Not Modified``.
    """
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        with requests.Session() as session:
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            first = session.get(url + path, timeout=10)  # connect before the clock starts
            expected = 200
            if conditional and first.headers.get("ETag"):
                session.headers["If-None-Match"] = first.headers["ETag"]
                expected = 304
            start.wait()
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    ok = session.get(url + path, timeout=10).status_code == expected
                except requests.RequestException:
                    ok = False
                latencies[i].append(time.perf_counter() - t0)
                errors[i] += not ok

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    deadline[0] = time.perf_counter() + duration_s
    start.wait()
    begun = time.perf_counter()
    for worker in workers:
        worker.join(duration_s + 30)
    elapsed = time.perf_counter() - begun
    flat = sorted(x for per in latencies for x in per)
    return {
        "requests": len(flat),
        "rps": len(flat) / elapsed,
        "p50_ms": 1000 * flat[len(flat) // 2] if flat else float("nan"),
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))] if flat else float("nan"),
        "errors": sum(errors),
    }


def submit_to_started(client: Client, dataset: str, spec: dict[str, Any], jobs: int) -> list[dict[str, float]]:
    """POST a job, read its events until the trainer's ``started``, cancel it, wait until it ends."""
    results = []
    for _ in range(jobs):
        posted = time.time()
        job = client.submit(dataset, spec)
        marks: dict[str, float] = {}
        for event in client.events(job["id"], read_timeout_s=120):
            data = event.json()
            if event.event == "state" and data.get("state") == RUNNING:
                marks["running"] = float(data["time"])
            if event.event == "started":
                marks["started"] = float(data["time"])
                client.cancel(job["id"])
            if event.is_terminal:
                break
        if "started" not in marks:
            raise RuntimeError(f"job {job['id']} ended before its trainer started")
        results.append(
            {
                "job": job["id"],
                "to_running_s": marks.get("running", float("nan")) - posted,
                "to_started_s": marks["started"] - posted,
            }
        )
    return results


def write_upload_file(path: Path, mib: int) -> None:
    """A valid data set of about ``mib`` MiB: float32 X_train (n, 256) of noise, int64 labels."""
    rows = max(64, mib * 2**20 // (256 * 4 + 8))
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("X_train", shape=(rows, 256), dtype="float32", chunks=(4096, 256))
        y = f.create_dataset("Y_train", shape=(rows,), dtype="int64")
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            x[start : start + n] = rng.standard_normal((n, 256), dtype=np.float32)
            y[start : start + n] = rng.integers(0, 10, n)


@contextlib.contextmanager
def rss_peak(pids: list[int]) -> Iterator[dict[str, float]]:
    """Sample the summed RSS of ``pids`` every 10 ms; yields a dict filled with before/peak on exit."""
    procs = [psutil.Process(pid) for pid in pids]

    def total() -> int:
        size = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                size += proc.memory_info().rss
        return size

    result = {"before": float(total()), "peak": 0.0}
    stop = threading.Event()
    peak = [result["before"]]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], total())
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join(5)
        result["peak"] = float(max(peak[0], total()))


def api_worker_pids(port: int) -> list[int]:
    """The gunicorn worker processes serving ``port``: the children of the arbiter that listens there."""
    listeners = [
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    ]
    for pid in listeners:
        with contextlib.suppress(psutil.Error):
            arbiter = psutil.Process(pid)
            while (parent := arbiter.parent()) is not None and "gunicorn" in " ".join(parent.cmdline()):
                arbiter = parent
            workers = [c.pid for c in arbiter.children() if "gunicorn" in " ".join(c.cmdline())]
            return sorted(workers or [arbiter.pid])
    return []


def upload_bench(client: Client, port: int, mib: int, work: Path) -> dict[str, float]:
    path = work / f"upload-{mib}mib.h5"
    write_upload_file(path, mib)
    size = path.stat().st_size
    started = time.perf_counter()  # baseline: what the API does at least (hash + write), on the bare disk
    digest = hashlib.sha256()
    with path.open("rb") as src, (work / "copy.bin").open("wb") as dst:
        while chunk := src.read(2**20):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    copy_s = time.perf_counter() - started
    (work / "copy.bin").unlink()
    pids = api_worker_pids(port)
    with rss_peak(pids) as rss:
        started = time.perf_counter()
        dataset = client.upload_dataset(path, name=path.name)
        upload_s = time.perf_counter() - started
    path.unlink()
    assert dataset["size_bytes"] == size
    return {
        "mib": size / 2**20,
        "upload_s": upload_s,
        "upload_mib_s": size / 2**20 / upload_s,
        "copy_mib_s": size / 2**20 / copy_s,
        "rss_growth_mib": (rss["peak"] - rss["before"]) / 2**20,
        "api_workers": len(pids),
    }


# ── the run ───────────────────────────────────────────────────────────────────────────────────────────
def check_loopback(url: str, what: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"{what} must be on 127.0.0.1 (this bench talks to nothing else). Received: {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="Use this running API (else a private stack is started).")
    parser.add_argument("--token", help="Token for --url (an admin's or any user's).")
    parser.add_argument("--redis-url", help="Redis of --url's stack, for the Celery baseline.")
    parser.add_argument("--threads", type=int, default=8, help="Concurrent GET clients.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of each GET load phase.")
    parser.add_argument("--jobs", type=int, default=3, help="Jobs timed from submit to trainer start.")
    parser.add_argument("--celery-rounds", type=int, default=50)
    parser.add_argument("--upload-mib", type=int, default=1024, help="Size of the upload (0: skip).")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn workers of the private stack.")
    parser.add_argument("--max-seconds", type=float, default=900, help="Hard stop of the whole bench.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    parser.add_argument("--celery-worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.celery_worker:
        check_loopback(args.celery_worker, "--celery-worker")
        run_noop_worker(args.celery_worker)
        return 0

    def too_long(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"the bench ran past --max-seconds={args.max_seconds:.0f}")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(args.max_seconds))
    work = Path(tempfile.mkdtemp(prefix="gpuyard-bench-"))
    stack: Stack | None = None
    try:
        if args.url:
            check_loopback(args.url, "--url")
            url, token, redis_url = args.url.rstrip("/"), args.token, args.redis_url
        else:
            port = free_port()
            stack = Stack(
                StackConfig(data_dir=work / "stack", port=port, api_workers=args.api_workers, grace_s=5),
                say=lambda line: print(line, file=sys.stderr),
            )
            stack.start()
            url, token, redis_url = stack.config.url, stack.admin_token, stack.redis_url
        if redis_url:
            check_loopback(redis_url, "--redis-url")
        port = urlparse(url).port or 80
        client = Client(url, token, timeout_s=60)
        figures: dict[str, Any] = {"cpus": os.cpu_count(), "threads": args.threads, "duration_s": args.duration}
        figures["load_average_at_start"] = os.getloadavg()

        say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        if redis_url:
            say(f"celery baseline: {args.celery_rounds} no-op round trips")
            figures["celery_rtt_s"] = celery_round_trips(redis_url, args.celery_rounds, work)
        say(f"submit → started: {args.jobs} jobs (each cancelled once its trainer starts)")
        digits = write_digits_h5(work / "digits.h5")
        dataset = client.upload_dataset(digits)["id"]
        spec = json.loads((REPO / "examples" / "specs" / "highway.json").read_text())
        spec["training"]["epochs"] = 200
        spec["training"].pop("early_stopping", None)
        figures["submit"] = submit_to_started(client, dataset, spec, args.jobs)
        job_id = figures["submit"][0]["job"]

        say(f"GET load: {args.threads} threads × {args.duration:.0f} s, /v1/health then /v1/jobs/<id>")
        figures["get_health"] = load(url, "/v1/health", None, args.threads, args.duration)
        figures["get_job"] = load(url, f"/v1/jobs/{job_id}", token, args.threads, args.duration)
        say("GET load: /v1/jobs/<id> with If-None-Match (the 304 path of a poller)")
        figures["get_job_304"] = load(url, f"/v1/jobs/{job_id}", token, args.threads, args.duration, conditional=True)

        if args.upload_mib > 0:
            say(f"upload: {args.upload_mib} MiB")
            figures["upload"] = upload_bench(client, port, args.upload_mib, work)
        print_table(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    except (ClientError, TimeoutError, RuntimeError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_table(f: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    health, job = f["get_health"], f["get_job"]
    rows.append(("GET /v1/health  req/s (baseline)", f"{health['rps']:.0f}", ""))
    rows.append(("GET /v1/jobs/<id>  req/s", f"{job['rps']:.0f}", f"{job['rps'] / health['rps']:.2f}× health"))
    rows.append(("GET /v1/health  p50 / p99 ms", f"{health['p50_ms']:.1f} / {health['p99_ms']:.1f}", ""))
    rows.append(
        (
            "GET /v1/jobs/<id>  p50 / p99 ms",
            f"{job['p50_ms']:.1f} / {job['p99_ms']:.1f}",
            f"{job['p50_ms'] / health['p50_ms']:.2f}× / {job['p99_ms'] / health['p99_ms']:.2f}× health",
        )
    )
    if "get_job_304" in f:
        cond = f["get_job_304"]
        rows.append(
            (
                "GET /v1/jobs/<id> If-None-Match → 304  req/s, p50 / p99 ms",
                f"{cond['rps']:.0f}, {cond['p50_ms']:.1f} / {cond['p99_ms']:.1f}",
                f"{cond['rps'] / health['rps']:.2f}× health; {cond['errors']} not 304",
            )
        )
    rows.append(("GET errors (health, job)", f"{health['errors']}, {job['errors']}", ""))
    meets = job["rps"] >= 500 and job["p99_ms"] < 50
    rows.append(("goal: GET job ≥ 500 req/s, p99 < 50 ms", "meets" if meets else "MISSES", ""))
    rtt = statistics.median(f["celery_rtt_s"]) if f.get("celery_rtt_s") else None
    if rtt is not None:
        rows.append(("bare Celery no-op round trip, median ms (baseline)", f"{1000 * rtt:.1f}", ""))
    running = statistics.median(s["to_running_s"] for s in f["submit"])
    started = statistics.median(s["to_started_s"] for s in f["submit"])
    per_job = ", ".join(f"{s['to_started_s']:.2f}" for s in f["submit"])
    rows.append(
        (
            "POST → worker 'running', median ms",
            f"{1000 * running:.0f}",
            f"{running / rtt:.1f}× Celery round trip" if rtt else "",
        )
    )
    rows.append(
        (
            "POST → trainer 'started', median s",
            f"{started:.2f}  ({per_job})",
            f"{started / rtt:.0f}× Celery round trip" if rtt else "",
        )
    )
    if "upload" in f:
        up = f["upload"]
        copy_ratio = up["upload_mib_s"] / up["copy_mib_s"]
        rows.append(
            (
                f"upload {up['mib']:.0f} MiB, MiB/s (to the 201)",
                f"{up['upload_mib_s']:.0f}",
                f"{copy_ratio:.2f}× local sha256+copy ({up['copy_mib_s']:.0f} MiB/s)",
            )
        )
        rows.append(
            (
                f"API RSS growth during upload ({up['api_workers']} workers), MiB",
                f"{up['rss_growth_mib']:.1f}",
                f"{up['rss_growth_mib'] / up['mib']:.3f}× the file",
            )
        )
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(
        f"\ngpuyard API bench — {f['cpus']} CPUs, {f['threads']} client threads, {f['duration_s']:.0f} s per load phase"
    )
    if "load_average_at_start" in f:
        start_load = ", ".join(f"{x:.2f}" for x in f["load_average_at_start"])
        end_load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"  load average at start {start_load}; at the end {end_load}")
    for name, value, ratio in rows:
        print(f"  {name:<{width}}  {value:>{value_width}}  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
