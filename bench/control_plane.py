"""Control-plane bench (CPU): ``/v1/health`` latency while trainers saturate the CPUs and streams are open.

Starts a private ``gpuyard up`` stack (``service.stack``: Redis, gunicorn, workers, janitor) on fake GPUs in a
temporary directory and measures ``GET /v1/health`` latency (p50, p99, max; sequential probes at
``--rate`` per second):

1. baseline: the stack idle;
2. loaded: ``--trainers`` real trainers (digits, a wide MLP, endless epochs, batch events as fast as the
   trainer sends them) saturating the CPUs, plus ``--streams`` event streams open on their jobs (raw
   sockets, drained by one thread).

It prints the figures (and the loaded/idle ratio) as JSON; the goal is a loaded p99 under 100 ms.
``--trainer-nice`` sets ``GPUYARD_TRAINER_NICE`` for the stack (0: trainers at the API's own priority,
to compare). It talks only to 127.0.0.1 and ends by itself (``--max-seconds`` is a hard stop).

    .venv/bin/python bench/control_plane.py --trainers 4 --streams 200 --duration 30
    .venv/bin/python bench/control_plane.py --trainer-nice 0     # what it was before
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.data.digits import write_digits_h5  # noqa: E402
from service.client import Client  # noqa: E402
from service.stack import Stack, StackConfig, free_port  # noqa: E402

SPEC: dict[str, Any] = {
    "architecture": {"family": "mlp", "input_shape": [64], "widths": [512, 512, 512]},
    "training": {"epochs": 100_000, "batch_size": 16},
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def health_latencies_ms(url: str, seconds: float, rate: float) -> tuple[list[float], list[str]]:
    """Sequential ``GET /v1/health`` probes, ``rate`` per second for ``seconds``: their latencies (a probe
    that fails counts as 10 s), and what each failure was."""
    latencies, failures = [], []
    period = 1.0 / rate
    with requests.Session() as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                status = session.get(url + "/v1/health", timeout=10).status_code
                failure = None if status == 200 else f"HTTP {status}"
            except requests.RequestException as exc:
                failure = type(exc).__name__
            elapsed = time.perf_counter() - started
            latencies.append(elapsed * 1000 if failure is None else 10_000.0)
            if failure is not None:
                failures.append(f"{failure} after {elapsed:.1f} s")
            time.sleep(max(0.0, period - elapsed))
    return latencies, failures


def summary(measured: tuple[list[float], list[str]]) -> dict[str, Any]:
    latencies, failures = measured
    ordered = sorted(latencies)
    return {
        "failures": failures,
        "probes": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.90 * len(ordered)))], 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max_ms": round(ordered[-1], 1),
    }


class StreamDrain:
    """``count`` event streams on the given jobs, read by one thread as fast as the server sends."""

    def __init__(self, port: int, token: str, job_ids: list[str], count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.bytes = 0
        self.events = 0
        self.closed = 0
        self._stop = threading.Event()
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            request = (
                f"GET /v1/jobs/{job_ids[i % len(job_ids)]}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            )
            sock.sendall(request.encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.5):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    sock.close()
                    self.closed += 1
                    continue
                self.bytes += len(data)
                self.events += data.count(b"\nevent: ")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self.selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def wait_training(client: Client, job_ids: list[str], timeout_s: float) -> None:
    """Until every job's trainer reports training progress."""
    deadline = time.monotonic() + timeout_s
    while True:
        stages = [(client.job(j).get("progress") or {}).get("stage") for j in job_ids]
        if all(stage == "training" for stage in stages):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"trainers not training after {timeout_s:.0f} s: {stages}")
        time.sleep(1)


def trainer_niceness(work: Path) -> list[int]:
    """The niceness of the trainers running in this bench's stack (their working folder is in ``work``)."""
    seen = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if "worker.trainer" in " ".join(proc.cmdline()) and proc.cwd().startswith(str(work)):
                seen.add(proc.nice())
    return sorted(seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trainers", type=int, default=4, help="Trainers running at once (fake GPU slots).")
    parser.add_argument("--streams", type=int, default=200, help="Event streams open on their jobs.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of each probing phase.")
    parser.add_argument("--rate", type=float, default=10.0, help="Health probes per second.")
    parser.add_argument("--trainer-nice", type=int, help="GPUYARD_TRAINER_NICE for the stack (default: its own).")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=600, help="Hard stop of the whole bench.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)

    def too_long(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"the bench ran past --max-seconds={args.max_seconds:.0f}")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(args.max_seconds))
    work = Path(tempfile.mkdtemp(prefix="gpuyard-cp-bench-"))
    env = dict(os.environ)
    env.update(
        GPUYARD_FAKE_GPUS=f"1x{16 * args.trainers}GiB",
        GPUYARD_GPU_SLOTS=str(args.trainers),
        GPUYARD_MAX_ACTIVE_JOBS_PER_USER=str(args.trainers + 10),
        GPUYARD_MAX_STREAMS_PER_USER=str(args.streams + 10),
        GPUYARD_WARM_TRAINERS="false",
    )
    if args.trainer_nice is not None:
        env["GPUYARD_TRAINER_NICE"] = str(args.trainer_nice)
    port = free_port()
    stack = Stack(
        StackConfig(data_dir=work / "stack", port=port, api_workers=args.api_workers, grace_s=5, base_env=env),
        say=say,
    )
    drain: StreamDrain | None = None
    client: Client | None = None
    job_ids: list[str] = []
    try:
        stack.start()
        url, token = stack.config.url, stack.admin_token
        assert token is not None
        client = Client(url, token, timeout_s=60)
        figures: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "load_avg_before": os.getloadavg(),
            "trainers": args.trainers,
            "streams": args.streams,
            "trainer_nice": env.get("GPUYARD_TRAINER_NICE", "default (settings)"),
        }
        say(f"idle: {args.duration:.0f} s of health probes")
        figures["idle"] = summary(health_latencies_ms(url, args.duration, args.rate))

        dataset = client.upload_dataset(write_digits_h5(work / "digits.h5"))["id"]
        fraction = round(0.9 / args.trainers, 3)
        spec = {**SPEC, "resources": {"gpu": "any", "memory_fraction": fraction}}
        job_ids = [client.submit(dataset, spec)["id"] for _ in range(args.trainers)]
        say(f"waiting for {args.trainers} trainers to train")
        wait_training(client, job_ids, timeout_s=240)
        figures["trainer_niceness_seen"] = trainer_niceness(work)
        figures["api_niceness"] = os.nice(0)
        say(f"opening {args.streams} event streams")
        drain = StreamDrain(port, token, job_ids, args.streams) if args.streams else None
        time.sleep(2)
        say(f"loaded: {args.duration:.0f} s of health probes")
        psutil.cpu_percent()
        events_before = drain.events if drain is not None else 0
        figures["loaded"] = summary(health_latencies_ms(url, args.duration, args.rate))
        figures["cpu_percent_during"] = psutil.cpu_percent()
        figures["load_avg_after"] = os.getloadavg()
        if drain is not None:
            figures["stream_events_per_s"] = round((drain.events - events_before) / args.duration, 1)
            figures["streams_closed"] = drain.closed
        figures["p99_ratio_loaded_to_idle"] = round(figures["loaded"]["p99_ms"] / figures["idle"]["p99_ms"], 2)
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        signal.alarm(0)
        if drain is not None:
            drain.close()
        if client is not None:
            for job_id in job_ids:
                with contextlib.suppress(Exception):
                    client.cancel(job_id)
            client.close()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
