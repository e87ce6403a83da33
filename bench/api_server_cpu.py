"""The API's own CPU per request, GET /v1/jobs/<id> against GET /v1/health (not in CI).

    .venv/bin/python bench/api_server_cpu.py            # private stack, 3 rounds × 500 requests each

``bench/api_load.py`` measures req/s with eight client threads on the same cores as the server: on a
shared box the load of other processes moves it by 2×. This bench sends requests one at a time and reads
the CPU seconds the gunicorn workers themselves spent (user + system, from /proc), which other processes
hardly change: the cost of the job path on the server, next to health's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from api_load import api_worker_pids  # noqa: E402

from models.data.digits import write_digits_h5  # noqa: E402
from service.client import Client  # noqa: E402
from service.stack import Stack, StackConfig, free_port  # noqa: E402

REQUESTS, ROUNDS = 500, 3


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="gpuyard-api-cpu-"))
    port = free_port()
    stack = Stack(StackConfig(data_dir=work / "stack", port=port, api_workers=2, grace_s=5), say=lambda _line: None)
    stack.start()
    try:
        url, token = stack.config.url, stack.admin_token
        dataset = Client(url, token, timeout_s=60).upload_dataset(write_digits_h5(work / "digits.h5"))["id"]
        spec = json.loads((ROOT / "examples" / "specs" / "highway.json").read_text())
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        job = session.post(url + "/v1/jobs", json={"dataset": dataset, "spec": spec}, timeout=60).json()["id"]
        session.post(url + f"/v1/jobs/{job}/cancel", timeout=60)
        time.sleep(3)  # the cancel settles
        workers = [psutil.Process(pid) for pid in api_worker_pids(port)]

        def cpu_s() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in workers)

        print(f"load average at start {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for round_number in range(1, ROUNDS + 1):
            for name, path in (("health", "/v1/health"), ("job", f"/v1/jobs/{job}")):
                cpu, wall = cpu_s(), time.perf_counter()
                for _ in range(REQUESTS):
                    session.get(url + path, timeout=60)
                print(
                    f"round {round_number}: GET {name:<6} server CPU {(cpu_s() - cpu) / REQUESTS * 1000:.3f} ms/req, "
                    f"wall {(time.perf_counter() - wall) / REQUESTS * 1000:.3f} ms/req (one client)",
                    flush=True,
                )
        print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
