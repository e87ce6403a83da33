"""Every GPU check of gpuyard in one run, driving the supervisor directly (no Celery, no Redis server).

    python bench/gpu_check.py            # a machine with an NVIDIA GPU: JAX backend, real NVML
    python bench/gpu_check.py --fake     # a dry rehearsal on CPU: two fake 16 GiB GPUs, fake trainer

Checks (each reports its own failure; the run goes on):

1. inventory      NVML lists the GPUs (uuid, index, PCI bus, name, memory, utilization, processes).
2. pair           two jobs at memory_fraction 0.3 run on one GPU at the same time (supervise() in two
                  threads, SQLite job DB); the watchdog's peak of each trainer's NVML memory stays within
                  its budget (0.3 × total + the context allowance).
3. over_budget    at the same time, a job whose budget is 0.02 × total + allowance but whose trainer is
                  started with --memory-fraction 0.2: JAX preallocates exactly that fraction, so NVML
                  shows it far over budget and the watchdog must SIGKILL it (memory_budget_exceeded,
                  peak recorded) while the pair above goes on. This proves the watchdog's NVML
                  accounting and kill path on a real driver; the framework caps themselves are what
                  check 2 shows holding.
4. hygiene        afterwards no process of ours is listed and the memory no process holds is back within
                  gpu_hygiene_tolerance_bytes of the baseline; the GPU was not quarantined.
5. warm           a warm trainer (worker/warm.py: JAX imported ahead, CUDA_VISIBLE_DEVICES pinned) takes a
                  job at memory_fraction 0.3: the cap, set after the import, still holds (NVML peak within
                  0.3 × total + allowance; JAX's default would preallocate 0.75), and submit → first
                  training step warm vs the same job started cold (goal warm ≤ 1.0 s).
6. overhead       samples/s of an mnist_cnn-shaped synthetic job through the trainer (cold and warm) vs a
                  bare Keras script on the same GPU, interleaved, median of ratios
                  (bench/trainer_overhead.py; goals ≥ 0.98, extra wall time per job ≤ 1 s).

Writes a markdown table to bench/results/gpu-<date>.md (and $OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
FAKE_TRAINER = ROOT / "tests" / "worker" / "fake_trainer.py"
GiB = 2**30

Row = tuple[str, str, str, bool | None]  # check, value, budget/goal, pass (None: not run)


class Checker:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def run(self, name: str, check: Callable[[], list[Row]]) -> None:
        started = time.monotonic()
        print(f"\n── {name} ──", flush=True)
        try:
            rows = check()
        except Exception as exc:  # fail soft: report, go on
            traceback.print_exc()
            rows = [(name, f"error: {type(exc).__name__}: {str(exc)[:200]}", "", False)]
        for row in rows:
            print(f"  {row[0]}: {row[1]}  (goal {row[2]})  {verdict(row[3])}", flush=True)
        print(f"  [{time.monotonic() - started:.1f} s]", flush=True)
        self.rows += rows


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", action="store_true", help="rehearse on CPU with two fake GPUs")
    parser.add_argument("--rows", type=int, default=None, help="rows of the synthetic data (checks 2, 3)")
    parser.add_argument("--overhead-rows", type=int, default=None)
    parser.add_argument("--overhead-epochs", type=int, default=None)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-warm", action="store_true")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--overhead-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.fake:
        os.environ["GPUYARD_FAKE_GPUS"] = "2x16GiB"
    os.environ["GPUYARD_REDIS_URL"] = ""  # no Redis server here: events go to the job DB only

    from core.settings import Settings
    from core.states import FAILED, QUEUED, SUCCEEDED
    from store import Database
    from worker.gpus import context_allowance_bytes, get_backend
    from worker.outcome import MEMORY_BUDGET_EXCEEDED, RESIZED_EVENT
    from worker.storage import LocalStorage

    work = Path(tempfile.mkdtemp(prefix="gpuyard-gpucheck-"))
    settings = Settings(
        data_dir=work,
        redis_url="",
        gpu_hygiene_wait_s=10.0,
        gpu_watchdog_interval_s=0.25,
        lease_seconds=120,
    )
    db = Database(settings.database_url)
    db.migrate()
    assert settings.storage_dir is not None
    storage = LocalStorage(settings.storage_dir)
    backend = get_backend(settings)
    allowance = context_allowance_bytes(settings)
    checker = Checker()
    state: dict[str, Any] = {}
    mode = "fake (CPU rehearsal)" if args.fake else "real NVML"
    print(f"gpuyard GPU check, {mode}, work dir {work}")

    # ── 1. inventory ──
    def inventory() -> list[Row]:
        devices = backend.devices()
        for d in devices:
            procs = ", ".join(f"{p.pid}:{p.memory_bytes // 2**20}MiB" for p in d.processes) or "none"
            print(
                f"  [{d.index}] {d.uuid} {d.pci_bus_id} {d.name}  {d.memory_used_bytes / GiB:.1f}/"
                f"{d.memory_total_bytes / GiB:.1f} GiB used, util {d.utilization_percent}%, processes {procs}"
            )
        if devices:
            gpu = devices[0]
            state.update(
                gpu=gpu.uuid,
                total=gpu.memory_total_bytes,
                baseline_unaccounted=gpu.unaccounted_bytes,
                baseline_used=gpu.memory_used_bytes,
            )
            db.register_gpu(
                gpu.uuid, host="local", index=gpu.index, name=gpu.name, memory_total_bytes=gpu.memory_total_bytes
            )
        names = "; ".join(f"{d.index}: {d.name} {d.memory_total_bytes / GiB:.0f} GiB" for d in devices)
        return [
            ("inventory (NVML)", f"{len(devices)} GPU(s): {names}" if devices else "no GPU", "≥ 1 GPU", bool(devices))
        ]

    checker.run("inventory", inventory)
    if "gpu" not in state:
        return finish(checker, args.fake)

    # ── data set, user ──
    from trainer_overhead import write_data

    rows = args.rows or (512 if args.fake else 8000)
    data = work / "cnn.h5"
    write_data(data, rows, "cnn")
    user, _ = db.create_user("gpucheck", is_admin=True)
    with data.open("rb") as fh:
        stored = storage.put_dataset_stream(fh, max_bytes=4 * GiB)
    dataset, _ = db.add_dataset(user.id, stored.sha256, stored.size_bytes, {}, stored.key, name="cnn")

    def make_job(fraction: float, max_attempts: int = 1, **fake: Any) -> str:
        spec: dict[str, Any] = {
            "name": f"gpucheck-{fraction:g}",
            "architecture": {"family": "cnn", "filters": [32, 64], "kernel_size": 3, "dense_units": 128},
            "training": {"epochs": 3, "batch_size": 128, "seed": 0},
            "resources": {"backend": "jax", "memory_fraction": fraction, "gpu": "any"},
        }
        if args.fake:
            spec["fake"] = fake
        return db.create_job(user.id, dataset.id, spec, max_active=100, max_attempts=max_attempts).id

    def supervise_in_thread(job_id: str, trainer_argv: list[str], outcomes: dict[str, Any]) -> threading.Thread:
        from worker.supervisor import supervise

        def target() -> None:
            outcomes[job_id] = supervise(
                job_id, settings, db=db, storage=storage, gpu=state["gpu"], backend=backend, trainer_argv=trainer_argv
            )

        thread = threading.Thread(target=target, name=job_id)
        thread.start()
        return thread

    # ── 2 + 3. the pair at 0.3 and the over-budget job, all at once ──
    def pair_and_over_budget() -> list[Row]:
        total = state["total"]
        trainer = [sys.executable, str(FAKE_TRAINER)] if args.fake else [sys.executable, "-m", "worker.trainer"]
        pair = [make_job(0.3, epochs=4, epoch_s=0.5, gpu_memory_bytes=int(0.28 * total)) for _ in range(2)]
        hog = make_job(0.02, max_attempts=2, epochs=20, epoch_s=0.5, gpu_memory_bytes=int(0.2 * total))
        hog_trainer = trainer if args.fake else [*trainer, "--memory-fraction", "0.2"]
        outcomes: dict[str, Any] = {}
        threads = [supervise_in_thread(j, trainer, outcomes) for j in pair]
        threads.append(supervise_in_thread(hog, hog_trainer, outcomes))
        for thread in threads:
            thread.join(240)
        jobs = {j: db.get_job(j) for j in [*pair, hog]}
        for job in jobs.values():
            print(
                f"  {job.id}: {job.state} {job.error_reason or ''} peak "
                f"{(job.peak_gpu_memory_bytes or 0) / 2**20:.0f} MiB  {job.error_detail or ''}"[:300]
            )
        budget = int(0.3 * total) + allowance
        a, b = (jobs[j] for j in pair)
        overlap = (
            a.started_at
            and b.started_at
            and a.finished_at
            and b.finished_at
            and max(a.started_at, b.started_at) < min(a.finished_at, b.finished_at)
        )
        overlap_s = (
            (min(a.finished_at, b.finished_at) - max(a.started_at, b.started_at)).total_seconds() if overlap else 0
        )
        rows_out: list[Row] = [
            ("pair: both succeeded", f"{a.state}, {b.state}", "succeeded ×2", a.state == b.state == SUCCEEDED),
            ("pair: ran at the same time on one GPU", f"overlap {overlap_s:.1f} s", "> 0 s", bool(overlap)),
        ]
        for name, job in (("pair A", a), ("pair B", b)):
            peak = job.peak_gpu_memory_bytes
            rows_out.append(
                (
                    f"{name}: peak NVML memory",
                    f"{(peak or 0) / 2**20:.0f} MiB",
                    f"≤ {budget / 2**20:.0f} MiB (0.3 × total + allowance)",
                    peak is not None and 0 < peak <= budget,
                )
            )
        h = jobs[hog]
        hog_budget = int(0.02 * total) + allowance
        events = [e.event for e in db.events_since(hog, 0, limit=10_000)]
        ran_s = (h.finished_at - h.started_at).total_seconds() if h.finished_at and h.started_at else None
        killed = [e for e in events if e.get("event") == "state" and e.get("reason") == MEMORY_BUDGET_EXCEEDED]
        resized = [e for e in events if e.get("event") == RESIZED_EVENT]
        rows_out += [
            (
                "over budget: killed by the watchdog",
                f"{h.state} ({killed[-1]['state'] if killed else h.error_reason})",
                "memory_budget_exceeded (requeued once at its peak, or failed)",
                bool(killed) and h.state in (QUEUED, FAILED),
            ),
            (
                "over budget: requeued at its measured peak + margin",
                f"memory_fraction {resized[0]['memory_fraction_from']} → {resized[0]['memory_fraction']}"
                if resized
                else "not resized",
                "≥ peak × margin (worker/supervisor.py _resize)",
                bool(resized) and h.state == QUEUED,
            ),
            (
                "over budget: peak recorded",
                f"{(h.peak_gpu_memory_bytes or 0) / 2**20:.0f} MiB",
                f"> {hog_budget / 2**20:.0f} MiB budget",
                (h.peak_gpu_memory_bytes or 0) > hog_budget,
            ),
            (
                "over budget: lifetime before the kill",
                f"{ran_s:.1f} s" if ran_s is not None else "?",
                "(JAX init + ≤ 1 s)",
                None,
            ),
            (
                "over budget: did not finish training",
                f"{sum(1 for e in events if e.get('event') == 'epoch_end')} epochs",
                "< 20",
                not any(e.get("event") == "finished" for e in events),
            ),
        ]
        state["job_ids"] = [*pair, hog]
        return rows_out

    checker.run("pair at 0.3 + over-budget job", pair_and_over_budget)

    # ── 4. hygiene ──
    def hygiene() -> list[Row]:
        deadline = time.monotonic() + 15
        while True:
            info = backend.device(state["gpu"])
            assert info is not None
            ours = [p.pid for p in info.processes if _descends_from_us(p.pid)]
            grown = info.unaccounted_bytes - state["baseline_unaccounted"]
            if (not ours and grown <= settings.gpu_hygiene_tolerance_bytes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        row = db.get_gpu(state["gpu"])
        return [
            ("hygiene: our processes gone", f"{len(ours)} left", "0", not ours),
            (
                "hygiene: memory no process holds vs baseline",
                f"{grown / 2**20:+.0f} MiB "
                f"(used {info.memory_used_bytes / 2**20:.0f} MiB, baseline {state['baseline_used'] / 2**20:.0f} MiB)",
                f"≤ {settings.gpu_hygiene_tolerance_bytes / 2**20:.0f} MiB",
                grown <= settings.gpu_hygiene_tolerance_bytes,
            ),
            (
                "hygiene: GPU not quarantined by the supervisor",
                row.quarantine_reason or "clean",
                "clean",
                row is not None and not row.quarantined,
            ),
        ]

    checker.run("hygiene", hygiene)

    # ── 4b. packing: four jobs at 0.25 on one GPU together against one alone (issue 11) ──
    def packing() -> list[Row]:
        if args.skip_packing:
            return [("packing", "skipped", "", None)]
        total = state["total"]
        trainer = [sys.executable, str(FAKE_TRAINER)] if args.fake else [sys.executable, "-m", "worker.trainer"]

        def rate(job_id: str) -> float:
            """The job's training samples/s: the median of its epochs after the first (compile)."""
            rates = [
                e.event.get("samples_per_s")
                for e in db.events_since(job_id, 0, limit=10_000)
                if e.event.get("event") == "epoch_end" and isinstance(e.event.get("samples_per_s"), int | float)
            ]
            return statistics.median(rates[1:] or rates) if rates else 0.0

        def run_together(count: int) -> list[Any]:
            ids = [make_job(0.25, epochs=4, epoch_s=0.5, gpu_memory_bytes=int(0.2 * total)) for _ in range(count)]
            outcomes: dict[str, Any] = {}
            threads = [supervise_in_thread(j, trainer, outcomes) for j in ids]
            for thread in threads:
                thread.join(240)
            return [db.get_job(j) for j in ids]

        alone = run_together(1)
        four = run_together(4)
        budget = int(0.25 * total) + allowance
        alone_rate = rate(alone[0].id)
        together = sum(rate(j.id) for j in four)
        starts = [j.started_at for j in four if j.started_at]
        ends = [j.finished_at for j in four if j.finished_at]
        overlap = len(starts) == len(ends) == 4 and max(starts) < min(ends)
        ratio = together / alone_rate if alone_rate else None
        return [
            ("packing: all five succeeded", ", ".join(j.state for j in [*alone, *four]), "succeeded ×5",
             all(j.state == SUCCEEDED for j in [*alone, *four])),
            ("packing: the four ran at once on one GPU", f"{len({j.gpu for j in four})} GPU(s), overlap {overlap}",
             "1 GPU, overlapping", overlap and len({j.gpu for j in four}) == 1),
            ("packing: aggregate samples/s, four together ÷ one alone",
             f"{ratio:.2f} ({together:,.0f} vs {alone_rate:,.0f})" if ratio else "no rate",
             "≥ 2×", None if args.fake or ratio is None else ratio >= 2.0),
            ("packing: each within its budget",
             ", ".join(f"{(j.peak_gpu_memory_bytes or 0) / 2**20:.0f}" for j in four) + " MiB",
             f"≤ {budget / 2**20:.0f} MiB (0.25 × total + allowance)",
             all(j.peak_gpu_memory_bytes is not None and 0 < j.peak_gpu_memory_bytes <= budget for j in four)),
            ("packing: suggested_memory_fraction recorded",
             ", ".join(f"{j.suggested_memory_fraction}" for j in four), "peak × 1.25 ÷ total",
             all(j.suggested_memory_fraction for j in four)),
        ]

    checker.run("packing: four at 0.25 on one GPU", packing)

    # ── 5. warm trainer: cap after import, submit → first step ──
    def warm_start() -> list[Row]:
        if args.skip_warm:
            return [("warm", "skipped", "", None)]
        from worker import warm
        from worker.supervisor import supervise

        trainer = [sys.executable, str(FAKE_TRAINER)] if args.fake else warm.default_trainer_argv()
        warm_settings = settings.model_copy(update={"warm_trainers": True})
        cold_settings = settings.model_copy(update={"warm_trainers": False})
        pool = warm.pool_for(warm_settings, state["gpu"], trainer)
        pool.start("jax")

        def wait_ready() -> float:
            began = time.monotonic()
            while pool.waiting is None or not (pool.waiting.ready() or args.fake):
                if time.monotonic() - began > 120:
                    raise RuntimeError("the warm trainer did not finish its import within 120 s")
                time.sleep(0.1)
            return time.monotonic() - began

        def first_step(job_settings: Any) -> tuple[Any, float | None, dict[str, Any]]:
            submitted = time.time()
            job_id = make_job(0.3, epochs=2, epoch_s=0.2, gpu_memory_bytes=int(0.28 * state["total"]))
            argv = trainer if args.fake else None
            supervise(job_id, job_settings, db=db, storage=storage, gpu=state["gpu"], backend=backend,
                      trainer_argv=argv)  # fmt: skip
            events = [e.event for e in db.events_since(job_id, 0, limit=100_000)]
            batch = next((e for e in events if e.get("event") in ("batch", "epoch_end")), None)
            started_event = next((e for e in events if e.get("event") == "started"), {})
            return db.get_job(job_id), (batch["time"] - submitted) if batch else None, started_event

        import_s = wait_ready()
        warm_job, warm_s, warm_started = first_step(warm_settings)
        wait_ready()  # the next warm trainer: let its import finish before the cold job starts
        warm.close_all()
        cold_job, cold_s, _ = first_step(cold_settings)
        budget = int(0.3 * state["total"]) + allowance
        peak = warm_job.peak_gpu_memory_bytes
        notes = " ".join((warm_started.get("env") or {}).get("notes") or [])
        return [
            ("warm: job succeeded on a warm trainer", f"{warm_job.state}; {notes[:80] or 'no note'}",
             "succeeded, warm", warm_job.state == SUCCEEDED and ("warm" in notes or args.fake)),
            ("warm: import ahead of the job", f"{import_s:.1f} s", "(reported)", None),
            ("warm: cap set after import, NVML peak", f"{(peak or 0) / 2**20:.0f} MiB "
             f"({warm_started.get('memory_cap', '?')})", f"≤ {budget / 2**20:.0f} MiB (0.3 × total + allowance)",
             peak is not None and 0 < peak <= budget),
            ("warm: submit → first step", f"{warm_s:.2f} s" if warm_s is not None else "?", "≤ 1.0 s",
             None if args.fake or warm_s is None else warm_s <= 1.0),
            ("cold: submit → first step", f"{cold_s:.2f} s ({cold_job.state})" if cold_s is not None else "?",
             "(reported)", None),
        ]  # fmt: skip

    checker.run("warm trainer", warm_start)

    # ── 6. overhead ──
    def overhead() -> list[Row]:
        if args.skip_overhead:
            return [("overhead", "skipped", "≥ 0.98", None)]
        out = work / "overhead.json"
        command = [sys.executable, str(ROOT / "bench" / "trainer_overhead.py"), "--family", "cnn", "--json", str(out)]
        command += ["--rounds", str(args.overhead_rounds)]
        if args.fake:
            backend_name = os.environ.get("GPUCHECK_FAKE_BACKEND", "tensorflow")
            command += [
                "--backend",
                backend_name,
                "--gpu",
                "cpu",
                "--rows",
                str(args.overhead_rows or 1000),
                "--epochs",
                str(args.overhead_epochs or 2),
            ]
        else:
            command += [
                "--backend",
                "jax",
                "--gpu",
                state["gpu"],
                "--rows",
                str(args.overhead_rows or 60000),
                "--epochs",
                str(args.overhead_epochs or 5),
            ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GPUYARD_FAKE_GPUS", None)
        done = subprocess.run(command, cwd=ROOT, env=env, timeout=300)
        if done.returncode != 0 or not out.exists():
            return [
                ("overhead: trainer vs bare Keras", f"trainer_overhead.py exited {done.returncode}", "≥ 0.98", False)
            ]
        result = json.loads(out.read_text())
        ratio = result["ratio"]
        value = (
            f"{ratio:.3f} ({result['trainer_samples_per_s']:.0f} vs {result['bare_samples_per_s']:.0f} "
            f"samples/s, {result['backend']}, {result['rows']} rows)"
        )
        rows_out: list[Row] = [
            ("overhead: trainer / bare samples/s", value, "≥ 0.98", None if args.fake else ratio >= 0.98)
        ]
        rows_out.append(
            (
                "overhead: with diagnostics + checkpoint",
                f"{result['ratio_with_diagnostics_and_checkpoint']:.3f}",
                "(reported)",
                None,
            )
        )
        for kind in ("cold", "warm"):
            if f"{kind}_ratio_median" in result:
                rows_out.append(
                    (
                        f"overhead: {kind} step-rate ratios (median)",
                        f"{result[f'{kind}_ratios']} ({result[f'{kind}_ratio_median']:.3f})",
                        "≥ 0.98",
                        None if args.fake else result[f"{kind}_ratio_median"] >= 0.98,
                    )
                )
                rows_out.append(
                    (
                        f"overhead: {kind} extra wall time per job",
                        f"{result[f'{kind}_extra_wall_s_per_job']:+.2f} s",
                        "≤ 1 s" if kind == "warm" else "(reported)",
                        None if args.fake or kind == "cold" else result[f"{kind}_extra_wall_s_per_job"] <= 1.0,
                    )
                )
        return rows_out

    checker.run("overhead", overhead)
    db.dispose()
    return finish(checker, args.fake)


def _descends_from_us(pid: int) -> bool:
    import psutil

    try:
        return any(parent.pid == os.getpid() for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def finish(checker: Checker, fake: bool) -> int:
    now = dt.datetime.now()
    stamp = now.strftime("%Y-%m-%d")
    title = "gpuyard GPU check" + (" (fake-GPU rehearsal on CPU)" if fake else "")
    lines = [
        f"# {title} — {now.isoformat(timespec='seconds')}",
        "",
        f"host `{os.uname().nodename}`, python {sys.version.split()[0]}",
        "",
        "| check | value | budget / goal | result |",
        "| --- | --- | --- | --- |",
    ]
    for name, value, goal, ok in checker.rows:
        lines.append(f"| {name} | {value} | {goal} | {verdict(ok)} |".replace("\n", " "))
    failed = [r for r in checker.rows if r[3] is False]
    lines += ["", f"{len(failed)} failed of {sum(1 for r in checker.rows if r[3] is not None)} checked."]
    text = "\n".join(lines) + "\n"
    name = f"gpu-{stamp}{'-fake' if fake else ''}.md"
    targets = [ROOT / "bench" / "results" / name]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / name)
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
        except OSError as exc:
            print(f"cannot write {target}: {exc}")
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
