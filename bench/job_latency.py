"""Submit → first training step: warm trainers, cold starts and a bare Keras script, interleaved (not in CI).

    python bench/job_latency.py                       # 20 jobs of each, digits, CPU (~6 min on 2 cores)
    python bench/job_latency.py --jobs 5 --json bench/results/job-latency-cpu.json

Each round runs, one after the other: a bare ``python -c "import keras; …"`` script (process start →
end of its first training step, same model and data), a job on a warm slot and a job started cold. A
job is submitted by creating its row in a job DB (what ``POST /v1/jobs`` does once the spec is valid)
and run by ``worker.supervisor.supervise`` in this process, as a Celery pool process runs it; its
first step ends when the trainer's first ``batch`` event says so. The HTTP and Celery hop in front
(about 65 ms, ``bench/api_load.py``) is not included. Before each job the slot's next warm trainer is
given time to finish its import (a warm worker is an idle one), so cold jobs do not share the CPU with
an import either.

Prints p50/p95 of each, the ratios of the p50s to the bare script's, and the goal: warm p50 ≤ 1.0 s.
Also the first step itself (fit's start → end of step 1), which every side pays: with TensorFlow it is
Keras tracing the step and XLA compiling it (``jit_compile="auto"``), the floor of the warm figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_WARM_P50_S = 1.0

SPEC: dict[str, Any] = {
    "name": "latency",
    "architecture": {"family": "highway", "depth": 2, "width": 32},
    "training": {"epochs": 1, "batch_size": 64, "seed": 0},
    "resources": {"gpu": "cpu", "backend": "tensorflow"},
}

BARE_SCRIPT = r"""
import json, sys, time
submitted = float(sys.argv[1])
import h5py, keras
from models.build import build_model
from models.data.summary import DatasetSummary
from models.spec import parse_spec

spec = parse_spec(json.loads(sys.argv[2]))
summary = DatasetSummary.model_validate_json(open(sys.argv[3]).read())
with h5py.File(sys.argv[4], "r") as f:
    x, y = f["X_train"][:], f["Y_train"][:]
keras.utils.set_random_seed(spec.training.seed)
model = build_model(spec, summary)

class FirstStep(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.fit_started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        print(json.dumps({"first_step_s": now - submitted, "step_s": now - self.fit_started}), flush=True)
        self.model.stop_training = True

model.fit(x, y, batch_size=spec.training.batch_size, epochs=1, verbose=0, callbacks=[FirstStep()])
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bare_first_step(data: Path, summary: Path, env: dict[str, str]) -> tuple[float, float]:
    submitted = time.time()
    done = subprocess.run(
        [sys.executable, "-c", BARE_SCRIPT, repr(submitted), json.dumps(SPEC), str(summary), str(data)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"bare script exited {done.returncode}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return float(report["first_step_s"]), float(report["step_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="jobs of each kind (warm, cold, bare)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.update(PYTHONPATH=python_path, TF_CPP_MIN_LOG_LEVEL="2", GPUYARD_REDIS_URL="")
    os.environ.pop("KERAS_BACKEND", None)
    bare_env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}

    from core.settings import Settings
    from core.states import SUCCEEDED
    from models.data.digits import write_digits_h5
    from models.data.sandbox import check_file
    from store import Database
    from worker import warm
    from worker.storage import LocalStorage
    from worker.supervisor import supervise

    work = Path(tempfile.mkdtemp(prefix="gpuyard-latency-"))
    settings = Settings(data_dir=work, redis_url="", lease_seconds=120, warm_trainers=False)
    warm_settings = settings.model_copy(update={"warm_trainers": True})
    db = Database(settings.database_url)
    db.migrate()
    assert settings.storage_dir is not None
    storage = LocalStorage(settings.storage_dir)
    data = write_digits_h5(work / "digits.h5")
    summary = check_file(data)
    summary_path = work / "summary.json"
    summary_path.write_text(summary.model_dump_json())
    user, _ = db.create_user("latency", is_admin=True)
    with data.open("rb") as fh:
        stored = storage.put_dataset_stream(fh, max_bytes=2**30)
    dataset, _ = db.add_dataset(
        user.id, stored.sha256, stored.size_bytes, summary.model_dump(mode="json"), stored.key, name="digits"
    )
    pool = warm.pool_for(warm_settings, "cpu", warm.default_trainer_argv())
    pool.start("tensorflow")

    def wait_warm_ready() -> None:
        deadline = time.monotonic() + 180
        while pool.waiting is None or not pool.waiting.ready():
            if time.monotonic() > deadline:
                raise SystemExit("the warm trainer did not finish its import within 180 s")
            time.sleep(0.1)

    def job_first_step(job_settings: Settings) -> tuple[float, float]:
        wait_warm_ready()
        submitted = time.time()
        job_id = db.create_job(user.id, dataset.id, SPEC, max_active=1000, max_attempts=1).id
        outcome = supervise(job_id, job_settings, db=db, storage=storage, gpu="cpu")
        if outcome.state != SUCCEEDED:
            raise SystemExit(f"job {job_id} ended {outcome.state} ({outcome.reason}): {outcome.detail}")
        events = [e.event for e in db.events_since(job_id, 0, limit=100_000)]
        first = next(e for e in events if e.get("event") == "batch")
        fit_started = next(e for e in events if e.get("event") == "epoch_start")
        return float(first["time"]) - submitted, float(first["time"]) - float(fit_started["time"])

    results: dict[str, list[float]] = {"bare": [], "warm": [], "cold": []}
    # Of each figure, the first step itself (fit's start → end of step 1: Keras tracing and, with
    # TensorFlow's jit_compile="auto", XLA compiling the step; the same work on every side).
    steps: dict[str, list[float]] = {"bare": [], "warm": [], "cold": []}
    try:
        for round_number in range(1, args.jobs + 1):
            wait_warm_ready()
            for kind, measure in (
                ("bare", lambda: bare_first_step(data, summary_path, bare_env)),
                ("warm", lambda: job_first_step(warm_settings)),
                ("cold", lambda: job_first_step(settings)),
            ):
                total, step = measure()
                results[kind].append(total)
                steps[kind].append(step)
            print(
                f"round {round_number:>2}: bare {results['bare'][-1]:6.2f} s  warm {results['warm'][-1]:6.2f} s  "
                f"cold {results['cold'][-1]:6.2f} s",
                flush=True,
            )
    finally:
        warm.close_all()
        db.dispose()

    summary_out: dict[str, Any] = {"jobs": args.jobs, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    for kind, values in results.items():
        summary_out[f"{kind}_p50_s"] = round(percentile(values, 0.5), 3)
        summary_out[f"{kind}_p95_s"] = round(percentile(values, 0.95), 3)
        summary_out[f"{kind}_first_step_itself_p50_s"] = round(percentile(steps[kind], 0.5), 3)
    summary_out["warm_p50_without_the_first_step_itself_s"] = round(
        percentile([t - s for t, s in zip(results["warm"], steps["warm"], strict=True)], 0.5), 3
    )
    bare_p50 = summary_out["bare_p50_s"]
    summary_out["warm_over_bare_p50"] = round(summary_out["warm_p50_s"] / bare_p50, 3)
    summary_out["cold_over_bare_p50"] = round(summary_out["cold_p50_s"] / bare_p50, 3)
    summary_out["warm_over_cold_p50"] = round(summary_out["warm_p50_s"] / summary_out["cold_p50_s"], 3)
    summary_out["warm_median_of_ratios_to_bare"] = round(
        statistics.median(w / b for w, b in zip(results["warm"], results["bare"], strict=True)), 3
    )
    summary_out["by_round"] = {k: [round(v, 3) for v in values] for k, values in results.items()}
    summary_out["first_step_itself_by_round"] = {k: [round(v, 3) for v in values] for k, values in steps.items()}
    for key, value in summary_out.items():
        if not key.endswith("by_round"):
            print(f"{key:>32}: {value}")
    verdict = "meets" if summary_out["warm_p50_s"] <= GOAL_WARM_P50_S else "MISSES"
    print(f"{'':>32}  {verdict} the goal: warm submit → first step p50 ≤ {GOAL_WARM_P50_S} s")
    first_steps = summary_out["warm_first_step_itself_p50_s"] / summary_out["bare_first_step_itself_p50_s"]
    verdict = "meets" if first_steps <= 0.7 else "MISSES"
    print(f"{'':>32}  {verdict} the goal: warm first step itself ≤ 0.7× the bare script's ({first_steps:.2f}×)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary_out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
