"""A random study on fake GPUs against the same trials one at a time (not in CI).

    python bench/study.py                                  # 32 trials, 2 fake GPUs x 4 slots (long on 2 cores)
    python bench/study.py --trials 8 --json bench/results/cpu-study.json

Starts ``gpuyard up`` with ``GPUYARD_FAKE_GPUS=2x16GiB`` (the real trainer, on the CPU), uploads digits and
runs a random study of small Highway models over the learning rate in [1e-4, 10] (log), ``max_parallel``
8, the median pruner and the default health pruning. Then, unless ``--no-baseline``, the same learning
rates again as a grid study with ``max_parallel`` 1 and no pruning: the trials one at a time, unpruned.

Prints: wall time of each and their ratio; the GPU slots' busy share during the study (trial seconds ÷
(wall × slots)); scheduling overhead per trial (the job queued after Optuna's ask → its trainer's
``started`` event, p50/p95); the pruned share, and the trial-seconds pruning saved (each pruned trial's
remaining epochs at its own mean epoch time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402  (bench scripts run from a checkout, not installed)
from service.client import Client  # noqa: E402
from store import Database  # noqa: E402

SLOTS = 8  # 2 fake GPUs x 4 quarter-GPU slots
SPEC: dict[str, Any] = json.loads((ROOT / "examples" / "specs" / "highway.json").read_text())
SPEC["architecture"].update(depth=2, width=32)
SPEC["training"].update(epochs=8, early_stopping=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stack(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    env.update(GPUYARD_FAKE_GPUS="2x16GiB", GPUYARD_JANITOR_INTERVAL_S="1")
    log = (data_dir.parent / "up.log").open("w")
    cmd = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", "up"]
    cmd += ["--data-dir", str(data_dir), "--port", str(port), "--api-workers", "1", "--grace", "5"]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while "ready: " not in (data_dir.parent / "up.log").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((data_dir.parent / "up.log").read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    return process


def run_study(client: Client, db: Database, body: dict[str, Any]) -> dict[str, Any]:
    """Run one study to its end; its wall time and per-trial figures from the job DB and events."""
    started = time.monotonic()
    study_id = client.create_study(body)["id"]
    while client.study(study_id)["finished_at"] is None:
        time.sleep(1)
    wall = time.monotonic() - started
    found = client.study(study_id)
    trials = []
    for job in db.study_jobs(study_id):
        events = [e.event for e in db.events_since(job.id, 0, limit=100_000)]
        start = next((e["time"] for e in events if e.get("event") == "started"), None)
        epochs = [e for e in events if e.get("event") == "epoch_end"]
        durations = [e.get("duration_s") or 0.0 for e in epochs]
        trials.append(
            {
                "number": job.trial_number,
                "state": job.state,
                "learning_rate": job.spec["training"]["optimizer"]["learning_rate"],
                "overhead_s": start - job.queued_at.timestamp() if start else None,
                "seconds": (job.finished_at - job.started_at).total_seconds()
                if job.finished_at and job.started_at
                else 0.0,
                "epochs_done": len(epochs),
                "mean_epoch_s": statistics.mean(durations) if durations else 0.0,
            }
        )
    return {"study": study_id, "wall_s": wall, "best": found.get("best"), "trials": trials}


def summarize(study: dict[str, Any], epochs: int) -> dict[str, Any]:
    trials = study["trials"]
    busy = sum(t["seconds"] for t in trials)
    overheads = sorted(t["overhead_s"] for t in trials if t["overhead_s"] is not None)
    pruned = [t for t in trials if t["state"] == "pruned"]
    saved = sum(max(0, epochs - t["epochs_done"]) * t["mean_epoch_s"] for t in pruned)
    return {
        "wall_s": round(study["wall_s"], 1),
        "slots_busy_share": round(busy / (study["wall_s"] * SLOTS), 3),
        "overhead_p50_s": round(statistics.median(overheads), 2) if overheads else None,
        "overhead_p95_s": round(overheads[int(0.95 * (len(overheads) - 1))], 2) if overheads else None,
        "pruned_share": round(len(pruned) / len(trials), 3) if trials else 0.0,
        "trial_seconds_saved_by_pruning": round(saved, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--no-baseline", action="store_true", help="Skip the one-at-a-time run.")
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    args = parser.parse_args()
    from models.data.digits import write_digits_h5  # scikit-learn: only when the bench runs

    with tempfile.TemporaryDirectory(prefix="gpuyard-bench-study-") as tmp:
        data_dir = Path(tmp) / "stack"
        port = free_port()
        stack = start_stack(data_dir, port)
        db = Database(Settings(data_dir=data_dir).database_url)
        try:
            _user, token = db.create_user("bench")
            with Client(f"http://127.0.0.1:{port}", token, timeout_s=120) as client:
                dataset = client.upload_dataset(write_digits_h5(Path(tmp) / "digits.h5"))["id"]
                body = {
                    "name": "bench random",
                    "dataset": dataset,
                    "spec": SPEC,
                    "space": {"training.optimizer.learning_rate": {"float": [1e-4, 10], "log": True}},
                    "sampler": "random",
                    "trials": args.trials,
                    "max_parallel": SLOTS,
                    "pruner": "median",
                    "seed": 7,
                }
                study = run_study(client, db, body)
                result: dict[str, Any] = {"trials": args.trials, "study": summarize(study, SPEC["training"]["epochs"])}
                if not args.no_baseline:
                    rates = [t["learning_rate"] for t in sorted(study["trials"], key=lambda t: t["number"])]
                    one_by_one = body | {
                        "name": "bench one at a time",
                        "space": {"training.optimizer.learning_rate": {"choice": rates}},
                        "sampler": "grid",
                        "trials": None,
                        "max_parallel": 1,
                        "pruner": "none",
                        "prune_on": [],
                    }
                    alone = run_study(client, db, one_by_one)
                    result["one_at_a_time"] = {"wall_s": round(alone["wall_s"], 1)}
                    result["wall_ratio"] = round(study["wall_s"] / alone["wall_s"], 3)
        finally:
            db.dispose()
            stack.send_signal(signal.SIGINT)
            stack.wait(60)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
