"""Dashboard render cost (CPU, in process): each page and live fragment against the JSON API it mirrors.

Builds the app on a temporary SQLite DB with one user holding ``--jobs`` finished jobs (each with
``--epochs`` epoch_end and diagnostics events), signs in with Flask's test client and times, median of
``--repeat`` requests each:

* ``/ui/jobs`` and its 2-second fragment ``/ui/jobs/rows`` (baseline: ``GET /v1/jobs?limit=200``);
* ``/ui/jobs/<id>`` and its fragment ``/ui/jobs/<id>/status`` (baseline: ``GET /v1/jobs/<id>``);
* ``/ui/compare`` of two jobs still without artifacts, read from their events (baseline: two
  ``GET /v1/jobs/<id>``).

No network, no worker, no framework import: what the numbers show is template and DB cost.

    .venv/bin/python bench/ui_pages.py --jobs 100 --epochs 30
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from service.app import create_app


class _NoQueue:
    def enqueue(self, job_id: str, queue: str | None = None) -> None:
        pass


def _median_ms(call: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), redis_url="redis://127.0.0.1:1/0", max_active_jobs_per_user=10**6)
        app = create_app({"TESTING": True, "GPUYARD_SETTINGS": settings, "GPUYARD_JOB_QUEUE": _NoQueue(),
                          "GPUYARD_GPU_HEARTBEATS": lambda uuids: {}})  # fmt: skip
        db = app.extensions["gpuyard"].db
        user, token = db.create_user("bench")
        summary = {"sha256": "0" * 64, "size_bytes": 1, "keys": {}, "arrays": {}, "rows": {"train": 1000},
                   "input_shape": [64], "target": "integer_labels", "num_classes": 10, "output_dim": 10}  # fmt: skip
        dataset, _ = db.add_dataset(user.id, "0" * 64, 1, summary, "datasets/x", name="x")
        blocks = {f"block{i}": {"gradient_norm": 0.1 * (i + 1), "activation_mean": 0.0, "activation_std": 1.0}
                  for i in range(20)}  # fmt: skip
        job_ids = []
        for n in range(args.jobs):
            spec = {"name": f"job {n}", "architecture": {"family": "mlp", "widths": [16] * (n % 5 + 1)}}
            job = db.create_job(user.id, dataset.id, spec, max_active=10**6, max_attempts=3)
            db.take_lease(job.id, "bench", 60)
            for epoch in range(1, args.epochs + 1):
                metrics = {"val_loss": 1 / epoch, "val_accuracy": 1 - 1 / epoch}
                db.append_event(job.id, {"event": "epoch_end", "epoch": epoch, "loss": 1 / epoch, "metrics": metrics})
                db.append_event(job.id, {"event": "diagnostics", "epoch": epoch, "blocks": blocks})
            db.finish_job(job.id, "bench", "succeeded", exit_code=0)
            job_ids.append(job.id)

        client = app.test_client()
        page = client.get("/ui/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        client.post("/ui/login", data={"token": token, "csrf_token": csrf})
        api = app.test_client()
        bearer = {"Authorization": f"Bearer {token}"}
        first, second = job_ids[0], job_ids[1]
        rows = [
            ("/ui/jobs", lambda: client.get("/ui/jobs"), lambda: api.get("/v1/jobs?limit=200", headers=bearer)),
            ("/ui/jobs/rows", lambda: client.get("/ui/jobs/rows"),
             lambda: api.get("/v1/jobs?limit=200", headers=bearer)),
            ("/ui/jobs/<id>", lambda: client.get(f"/ui/jobs/{first}"),
             lambda: api.get(f"/v1/jobs/{first}", headers=bearer)),
            ("/ui/jobs/<id>/status", lambda: client.get(f"/ui/jobs/{first}/status"),
             lambda: api.get(f"/v1/jobs/{first}", headers=bearer)),
            ("/ui/compare (2 jobs, from events)", lambda: client.get(f"/ui/compare?jobs={first},{second}"),
             lambda: (api.get(f"/v1/jobs/{first}", headers=bearer), api.get(f"/v1/jobs/{second}", headers=bearer))[1]),
        ]  # fmt: skip
        print(f"{args.jobs} jobs × {args.epochs} epochs, median of {args.repeat}")
        print(f"{'page':40} {'ms':>8} {'API ms':>8} {'ratio':>6}")
        for name, page_call, baseline_call in rows:
            page_ms = _median_ms(page_call, args.repeat)
            base_ms = _median_ms(baseline_call, args.repeat)
            print(f"{name:40} {page_ms:8.1f} {base_ms:8.1f} {page_ms / base_ms:6.2f}")
        db.dispose()


if __name__ == "__main__":
    main()
