"""Runs one job for a Celery task: lease, trainer process group, event relay, cancel, time limit, outcome.

``supervise(job_id)`` is the whole of the ``gpuyard.train`` task and is what tests call directly::

    take_lease ─ none: another delivery holds the job (or it is finished/cancelled) → return, do nothing
      │
    stage: spec.json and the data set path; --resume when attempt > 1 and a checkpoint exists
      │
    start  python -m worker.trainer --out <storage>/jobs/<id>  (own process group, stdout piped,
      │    stderr appended to jobs/<id>/trainer.log, SIGTERM'd if this process dies)
      │
    loop   each stdout event → job_events + pub/sub ``gpuyard:job:<id>:events`` (+ progress);
      │    every poll: cancel flag → SIGTERM the group, SIGKILL after the grace period;
      │    past max_runtime_s (+ grace, the trainer enforces it first) → the same, failed time_limit;
      │    lease renewed by a thread; lease lost → SIGKILL the group, record nothing;
      │    on a GPU, a watchdog thread (worker/watchdog.py) reads the group's GPU memory every
      │    gpu_watchdog_interval_s; past fraction × total + allowance → SIGKILL, memory_budget_exceeded.
      │
    hygiene (GPU): the job's processes gone, no new memory held by no process → else quarantine the GPU
      │
    exit code → succeeded | failed(reason) | cancelled, lease released (finish_job, with the peak GPU
    memory), then ``dispatch()`` so the freed room is used at once

Redis is optional: without ``redis_url`` events go to the DB only (``bench/gpu_check.sh`` runs so).

Nothing here imports TensorFlow, JAX or torch: the framework lives only in the trainer process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

try:  # optional: without Redis (bench/gpu_check.sh) events go to the job DB only
    import redis
except ImportError:  # pragma: no cover - redis-py is a dependency of the service
    redis = None  # type: ignore[assignment]

import worker
from core.atomicio import atomic_write_json
from core.exitcodes import ExitCode
from core.names import CHECKPOINT_DIR, CHECKPOINT_STATE, PID_FILE, SPEC_FILE, TRAINER_LOG
from core.settings import Settings, get_settings
from core.states import CANCELLED, FAILED, QUEUED, SUCCEEDED
from worker import procs
from worker.db import Database, Job, JobDBError
from worker.gpus import GpuBackend, context_allowance_bytes, declare_fake_process_if_absent, get_backend
from worker.storage import LocalStorage, Storage
from worker.watchdog import MemoryWatchdog, hygiene_problem

log = logging.getLogger(__name__)


# How long after the trainer's exit we wait for its stdout to close (a grandchild may hold it open).
_EOF_WAIT_S = 2.0
_EOF = object()
_TRAINER_WITHOUT = ("database_url", "redis_url")
MEMORY_BUDGET_EXCEEDED = "memory_budget_exceeded"


def events_channel(job_id: str) -> str:
    """The Redis pub/sub channel carrying a job's events."""
    return f"gpuyard:job:{job_id}:events"


@dataclass(frozen=True)
class Outcome:
    """What one delivery of ``gpuyard.train`` did (the task's return value).

    ``ran`` is False when the delivery found the job leased by someone else, finished, or cancelled,
    and did nothing. ``state`` is None when the attempt ended without a verdict (lease lost; handed back
    to the queue).
    """

    job_id: str
    ran: bool
    state: str | None = None
    reason: str | None = None
    detail: str | None = None
    exit_code: int | None = None
    attempt: int | None = None
    resumed: bool = False
    trainer_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ── pieces ────────────────────────────────────────────────────────────────────────────────────────────
class EventPublisher:
    """Publishes job events on Redis pub/sub; a broken Redis costs live updates, never the job."""

    def __init__(self, redis_url: str | None) -> None:
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
            if redis_url and redis is not None
            else None
        )
        self._warned = False

    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        if self._client is None:
            return
        try:
            self._client.publish(events_channel(job_id), json.dumps(payload, default=str))
        except Exception as exc:  # redis.RedisError and its kin: live updates are best effort
            if not self._warned:
                log.warning("job %s: cannot publish events to Redis (%s); the DB still gets them", job_id, exc)
                self._warned = True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LeaseKeeper(threading.Thread):
    """Renews ``owner``'s lease every ``interval_s``; sets ``lost`` when the DB says it is gone."""

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float, interval_s: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.db, self.job_id, self.owner = db, job_id, owner
        self.lease_seconds, self.interval_s = lease_seconds, interval_s
        self.lost = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                if not self.db.renew_lease(self.job_id, self.owner, self.lease_seconds):
                    self.lost.set()
                    return
            except JobDBError as exc:  # a DB hiccup: try again next round; the lease outlives a few
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=10)


def default_owner(task_id: str | None = None) -> str:
    """A lease owner unique per delivery: ``host:pid:task``."""
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"


def trainer_env(settings: Settings) -> dict[str, str]:
    """The trainer's environment: ours, plus the settings as ``GPUYARD_*`` so both read the same values
    (less the DB and Redis URLs: a trainer reports through stdout only)."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and not isinstance(value, dict | list):
            env[f"GPUYARD_{name.upper()}"] = str(value)
    for name in _TRAINER_WITHOUT:  # the trainer needs neither; they may carry passwords
        env.pop(f"GPUYARD_{name.upper()}", None)
    package_root = str(Path(worker.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def classify_exit(
    exit_code: int, stop_reason: str | None, failed_event: dict[str, Any] | None
) -> tuple[str | None, str, str | None]:
    """Map the trainer's exit to ``(state, reason, detail)``; state None means "hand the job back".

    Args:
        exit_code: ``Popen.returncode`` (negative: killed by that signal).
        stop_reason: why the supervisor stopped it (``cancelled``, ``time_limit``) or None.
        failed_event: the trainer's last ``failed`` event, if any (its detail is the user's message).
    """
    detail = (failed_event or {}).get("detail")
    if exit_code == ExitCode.SUCCEEDED:
        return SUCCEEDED, ExitCode.SUCCEEDED.reason, None
    if stop_reason == "cancelled":
        return CANCELLED, "cancelled", "cancelled on request"
    if stop_reason == "time_limit":
        return FAILED, ExitCode.TIME_LIMIT.reason, detail or "the job ran past its max_runtime_s"
    if stop_reason == MEMORY_BUDGET_EXCEEDED:
        return FAILED, MEMORY_BUDGET_EXCEEDED, "the job used more GPU memory than its memory_fraction allows"
    if exit_code < 0:
        name = signal.strsignal(-exit_code) or f"signal {-exit_code}"
        hint = " (the kernel's OOM killer does this when the host runs out of memory)"
        return (
            FAILED,
            ExitCode.INTERNAL_ERROR.reason,
            (f"the trainer was killed by {name}" + (hint if -exit_code == signal.SIGKILL else "")),
        )
    try:
        code = ExitCode(exit_code)
    except ValueError:
        return FAILED, ExitCode.INTERNAL_ERROR.reason, detail or f"the trainer exited with code {exit_code}"
    if code is ExitCode.CANCELLED:  # SIGTERM from someone else (host shutdown): not the job's doing
        return (
            None,
            "trainer_terminated",
            detail or "the trainer was stopped by a signal from outside gpuyard",
        )
    if code.is_users_fault:
        return FAILED, code.reason, detail
    return FAILED, ExitCode.INTERNAL_ERROR.reason, detail or f"the trainer exited with code {exit_code}"


# ── the supervisor ────────────────────────────────────────────────────────────────────────────────────
class Supervisor:
    """One delivery of one job. Use :func:`supervise`; the class only keeps the run's state together."""

    def __init__(
        self,
        job_id: str,
        settings: Settings,
        db: Database,
        storage: Storage,
        *,
        owner: str,
        gpu: str,
        publisher: EventPublisher,
        requeue: Callable[[str], None] | None,
        trainer_argv: Sequence[str] | None,
        backend: GpuBackend | None = None,
    ) -> None:
        self.job_id, self.settings, self.db, self.storage = job_id, settings, db, storage
        self.owner, self.gpu, self.publisher, self.requeue = owner, gpu, publisher, requeue
        self.trainer_argv = list(
            trainer_argv or shlex.split(settings.trainer_command) or [sys.executable, "-m", "worker.trainer"]
        )
        self.backend = backend
        self.published_seq = 0
        self.failed_event: dict[str, Any] | None = None
        self.progress: dict[str, Any] = {}
        self.watchdog: MemoryWatchdog | None = None

    # ── top level ──
    def run(self) -> Outcome:
        job = self.db.take_lease(self.job_id, self.owner, self.settings.lease_seconds, gpu=self.gpu)
        if job is None:
            log.info("job %s: not taken (leased elsewhere, finished or cancelled); nothing to do", self.job_id)
            return Outcome(self.job_id, ran=False)
        self.published_seq = job.last_event_seq  # the "running" state event comes right after
        self._publish_db_events()
        keeper = LeaseKeeper(
            self.db, self.job_id, self.owner, self.settings.lease_seconds, self.settings.lease_seconds / 3
        )
        keeper.start()
        try:
            return self._attempt(job, keeper)
        except Exception as exc:
            # A bug here would repeat on every retry: record it once instead of looping through attempts.
            # If the DB itself is down this fails too, the lease expires and the janitor retries later.
            log.exception("job %s: supervisor error", self.job_id)
            detail = f"supervisor error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(JobDBError):
                self.db.finish_job(self.job_id, self.owner, FAILED, ExitCode.INTERNAL_ERROR.reason, detail)
            return Outcome(
                self.job_id,
                ran=True,
                state=FAILED,
                reason="internal_error",
                detail=detail,
                attempt=job.attempts,
            )
        finally:
            keeper.stop()
            with contextlib.suppress(JobDBError):
                self._publish_db_events()

    def _attempt(self, job: Job, keeper: LeaseKeeper) -> Outcome:
        job_dir = self.storage.local_path(self.storage.job_key(self.job_id))
        job_dir.mkdir(parents=True, exist_ok=True)
        if self.db.is_cancel_requested(self.job_id):
            return self._finish(job, CANCELLED, "cancelled", "cancelled before the trainer started", None)
        data_path = self._stage_dataset(job)
        if data_path is None:
            detail = "the job's data set was deleted or its file is missing from storage"
            return self._finish(job, FAILED, ExitCode.DATASET_INVALID.reason, detail, None)
        atomic_write_json(job_dir / SPEC_FILE, job.spec)
        resume = job.attempts > 1 and (job_dir / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file()
        # A trainer orphaned by a dead worker on this host may still be writing its checkpoint.
        stale = procs.stop_stale_trainer(job_dir / PID_FILE, self.settings.cancel_grace_s)
        if stale is not None:
            log.warning("job %s: stopped trainer %d left by an earlier attempt", self.job_id, stale)

        argv = [
            *self.trainer_argv,
            "--spec",
            str(job_dir / SPEC_FILE),
            "--data",
            str(data_path),
            "--out",
            str(job_dir),
            "--gpu",
            self.gpu,
        ]
        if resume:
            argv.append("--resume")
        with (job_dir / TRAINER_LOG).open("ab") as log_file:
            header = (
                f"\n=== gpuyard attempt {job.attempts} on {socket.gethostname()} at "
                f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"
                f"{' (resuming from checkpoint)' if resume else ''} ===\n"
            )
            log_file.write(header.encode())
            log_file.flush()
            proc = subprocess.Popen(
                procs.launcher_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,  # its own process group: we signal the group, never the worker
                env=trainer_env(self.settings),
                cwd=job_dir,
            )
        procs.write_pid_file(job_dir / PID_FILE, proc.pid)
        unaccounted_before = self._start_watchdog(job, proc.pid)
        self.progress["trainer_pid"] = proc.pid  # its process group: GET /v1/gpus maps GPU memory to jobs
        with contextlib.suppress(JobDBError):
            self.db.record_progress(self.job_id, dict(self.progress), owner=self.owner)
        log.info(
            "job %s: attempt %d, trainer pid %d%s",
            self.job_id,
            job.attempts,
            proc.pid,
            " (resume)" if resume else "",
        )
        try:
            stop_reason = self._watch(proc, job, keeper)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            # Kill whatever is left in the group (everything, after an exception in _watch; stragglers the
            # trainer left behind, otherwise) while the unreaped leader still pins the group id, then reap.
            procs.signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        (job_dir / PID_FILE).unlink(missing_ok=True)
        if self.watchdog is not None and self.watchdog.exceeded.is_set() and stop_reason != "lease_lost":
            stop_reason = MEMORY_BUDGET_EXCEEDED
        self._check_hygiene(unaccounted_before)

        base = {
            "job_id": self.job_id,
            "ran": True,
            "attempt": job.attempts,
            "resumed": resume,
            "trainer_pid": proc.pid,
            "exit_code": proc.returncode,
        }
        if stop_reason == "lease_lost":
            log.warning("job %s: lease lost; trainer killed, nothing recorded", self.job_id)
            return Outcome(**base, reason="lease_lost")
        if stop_reason is None and proc.returncode != 0 and self.db.is_cancel_requested(self.job_id):
            stop_reason = "cancelled"  # asked between our last poll and the trainer's exit
        state, reason, detail = classify_exit(proc.returncode, stop_reason, self.failed_event)
        if reason == MEMORY_BUDGET_EXCEEDED and self.watchdog is not None:
            detail = (
                f"the job held {_mib(self.watchdog.exceeded_bytes)} of GPU memory, over its budget of "
                f"{_mib(self.watchdog.budget_bytes)} (memory_fraction × the GPU's total + "
                f"{_mib(context_allowance_bytes(self.settings))} allowance); killed. Ask for a larger "
                "resources.memory_fraction or make the model smaller"
            )
        if state is None:
            return self._hand_back(base, reason, detail)
        outcome = self._finish(job, state, None if state == SUCCEEDED else reason, detail, proc.returncode)
        return Outcome(**{**base, "state": outcome.state, "reason": outcome.reason, "detail": outcome.detail})

    # ── staging ──
    def _stage_dataset(self, job: Job) -> Path | None:
        """The local path of the job's data set (LocalStorage: in place; remote storage would copy here)."""
        if job.dataset_id is None:
            return None
        dataset = self.db.get_dataset(job.dataset_id)
        if dataset is None:
            return None
        path = self.storage.local_path(dataset.storage_key)
        return path if path.is_file() else None

    # ── GPU: watchdog and hygiene ──
    def _start_watchdog(self, job: Job, pgid: int) -> int:
        """Start the memory watchdog of a GPU job; returns the GPU's unaccounted memory before the job."""
        if self.gpu in ("cpu", "any", "") or self.backend is None:
            return 0
        info = self.backend.device(self.gpu)
        if info is None:
            log.warning("job %s: GPU %s is not in the inventory; no memory watchdog", self.job_id, self.gpu)
            return 0
        if self.backend.kind == "fake":
            # The fake GPU counts the trainer's RSS unless the trainer (or a test) declares a figure.
            assert self.settings.fake_gpu_dir is not None
            declare_fake_process_if_absent(self.settings.fake_gpu_dir, self.gpu, pgid)
        fraction = float(((job.spec.get("resources") or {}).get("memory_fraction")) or 0.25)
        budget = int(fraction * info.memory_total_bytes) + context_allowance_bytes(self.settings)
        self.watchdog = MemoryWatchdog(
            self.backend, self.gpu, pgid, budget, self.settings.gpu_watchdog_interval_s, self.job_id
        )
        self.watchdog.start()
        return info.unaccounted_bytes

    def _check_hygiene(self, unaccounted_before: int) -> None:
        """After the trainer's group is gone: quarantine the GPU unless it is back to clean."""
        if self.watchdog is None or self.backend is None:
            return
        problem = hygiene_problem(
            self.backend,
            self.gpu,
            self.watchdog.pids,
            unaccounted_before,
            self.settings.gpu_hygiene_tolerance_bytes,
            self.settings.gpu_hygiene_wait_s,
        )
        if problem is None:
            return
        reason = f"after job {self.job_id}: {problem}"
        log.error("GPU %s quarantined: %s", self.gpu, reason)
        try:
            self.db.quarantine_gpu(self.gpu, reason)
        except JobDBError as exc:
            log.warning("GPU %s: cannot record the quarantine: %s", self.gpu, exc)

    # ── the watch loop ──
    def _watch(self, proc: subprocess.Popen[bytes], job: Job, keeper: LeaseKeeper) -> str | None:
        """Relay events until the trainer exits; stop it on cancel, time limit or lost lease."""
        events: queue.Queue[Any] = queue.Queue()
        assert proc.stdout is not None
        reader = threading.Thread(
            target=_read_lines, args=(proc.stdout, events), daemon=True, name=f"events-{self.job_id}"
        )
        reader.start()
        grace = self.settings.cancel_grace_s
        poll = self.settings.cancel_poll_s
        started = time.monotonic()
        max_runtime = (job.spec.get("resources") or {}).get("max_runtime_s")
        # The trainer stops itself at max_runtime_s, cleanly; we step in only if it does not.
        deadline = started + float(max_runtime) + grace if max_runtime else None
        stop_reason: str | None = None
        kill_at: float | None = None
        next_poll = started
        eof = False
        exited_at: float | None = None
        while True:
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is _EOF:
                eof = True
            elif item is not None:
                self._relay(item)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + poll
                if stop_reason is None:
                    stop_reason = self._stop_reason(keeper, deadline, now)
                    if stop_reason in ("lease_lost", MEMORY_BUDGET_EXCEEDED):
                        procs.signal_group(proc.pid, signal.SIGKILL)  # someone else may own the job now
                    elif stop_reason is not None:
                        log.info("job %s: stopping trainer (%s)", self.job_id, stop_reason)
                        procs.signal_group(proc.pid, signal.SIGTERM)
                        kill_at = now + grace
                if kill_at is not None and now >= kill_at and not _has_exited(proc):
                    log.warning("job %s: trainer ignored SIGTERM for %.1f s; killing it", self.job_id, grace)
                    procs.signal_group(proc.pid, signal.SIGKILL)
                    kill_at = None
            if _has_exited(proc):
                exited_at = exited_at or now
                if eof or now - exited_at > _EOF_WAIT_S:
                    break
        reader.join(timeout=1)
        while True:  # events read after the loop ended
            try:
                item = events.get_nowait()
            except queue.Empty:
                break
            if item is not _EOF:
                self._relay(item)
        return stop_reason

    def _stop_reason(self, keeper: LeaseKeeper, deadline: float | None, now: float) -> str | None:
        if keeper.lost.is_set():
            return "lease_lost"
        if self.watchdog is not None and self.watchdog.exceeded.is_set():
            return MEMORY_BUDGET_EXCEEDED  # the watchdog already killed the group
        try:
            if self.db.is_cancel_requested(self.job_id):
                return "cancelled"
        except JobDBError as exc:
            log.warning("job %s: cannot read the cancel flag: %s", self.job_id, exc)
        if deadline is not None and now >= deadline:
            return "time_limit"
        return None

    def _relay(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            log.warning("job %s: trainer wrote a non-event line to stdout: %.200s", self.job_id, text)
            return
        kind = event["event"]
        if kind == "failed":
            self.failed_event = event
        try:
            seq = self.db.append_event(self.job_id, event)
            progress = _progress_of(event)
            if progress:
                self.progress.update(progress)
                self.db.record_progress(self.job_id, dict(self.progress), owner=self.owner)
        except JobDBError as exc:
            log.warning("job %s: cannot store %s event: %s", self.job_id, kind, exc)
            self.publisher.publish(self.job_id, event)
            return
        self.published_seq = max(self.published_seq, seq)
        self.publisher.publish(self.job_id, {"seq": seq, **event})

    # ── endings ──
    def _finish(self, job: Job, state: str, reason: str | None, detail: str | None, exit_code: int | None) -> Outcome:
        peak = self.watchdog.peak_bytes if self.watchdog is not None and self.watchdog.readings else None
        if not self.db.finish_job(
            self.job_id, self.owner, state, reason, detail, exit_code, peak_gpu_memory_bytes=peak
        ):
            log.warning("job %s: lease lost before the result could be recorded", self.job_id)
            return Outcome(self.job_id, ran=True, reason="lease_lost", attempt=job.attempts, exit_code=exit_code)
        log.info("job %s: %s%s", self.job_id, state, f" ({reason})" if reason else "")
        return Outcome(
            self.job_id,
            ran=True,
            state=state,
            reason=reason,
            detail=detail,
            exit_code=exit_code,
            attempt=job.attempts,
        )

    def _hand_back(self, base: dict[str, Any], reason: str, detail: str | None) -> Outcome:
        new_state = self.db.requeue_job(self.job_id, self.owner, reason, detail)
        if new_state == QUEUED and self.requeue is not None:
            self.requeue(self.job_id)
        log.warning("job %s: handed back (%s), now %s", self.job_id, reason, new_state)
        return Outcome(**base, state=new_state, reason=reason, detail=detail)

    def _publish_db_events(self) -> None:
        """Publish the DB's own events (state changes) that we have not published yet."""
        for stored in self.db.events_since(self.job_id, self.published_seq):
            self.publisher.publish(self.job_id, {"seq": stored.seq, **stored.event})
            self.published_seq = stored.seq


def _mib(value: int | None) -> str:
    return f"{(value or 0) / 2**20:.0f} MiB"


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the trainer exited, without reaping it: its zombie keeps the group id from being reused."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _read_lines(stream: IO[bytes], events: queue.Queue[Any]) -> None:
    try:
        for line in iter(stream.readline, b""):
            events.put(line)
    except (OSError, ValueError):
        pass
    finally:
        events.put(_EOF)


def _progress_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """The job's ``last_progress`` fields an event updates, or None for events that carry none."""
    kind = event.get("event")
    if kind == "epoch_end":
        keys = ("epoch", "epochs", "loss", "metrics", "samples_per_s", "eta_s")
        return {"stage": "training", **{k: event.get(k) for k in keys}, "step": None}
    if kind == "batch":
        keys = ("epoch", "step", "steps", "loss", "samples_per_s", "eta_s")
        return {"stage": "training", **{k: event[k] for k in keys if k in event}}
    if kind == "started":
        return {
            "stage": "started",
            "epochs": event.get("epochs"),
            "resumed_from_epoch": event.get("resumed_from_epoch"),
        }
    if kind == "finished":
        # Final metrics are nested by split (train/val/test); `metrics` stays the flat per-epoch figures.
        return {"stage": "finished", "final_metrics": event.get("metrics")}
    if kind == "health":  # the current findings (models/health.py): each event replaces the last
        return {"health": event.get("findings") or []}
    return None


# ── entry point ───────────────────────────────────────────────────────────────────────────────────────
def supervise(
    job_id: str,
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    storage: Storage | None = None,
    owner: str | None = None,
    gpu: str | None = None,
    requeue: Callable[[str], None] | None = None,
    trainer_argv: Sequence[str] | None = None,
    backend: GpuBackend | None = None,
    dispatch: Callable[[], object] | None = None,
) -> Outcome:
    """Run one delivery of job ``job_id`` to its end; idempotent against duplicate deliveries.

    Args:
        job_id: the job.
        settings: defaults to the process's settings.
        db: the job database (default: one opened for this call from ``settings.database_url``).
        storage: artifact and data set storage (default: ``LocalStorage(settings.storage_dir)``).
        owner: lease owner, unique per delivery (default: ``host:pid:random``).
        gpu: GPU UUID for the trainer, or ``cpu`` (default: ``settings.worker_gpu``).
        requeue: called with the job id when the job is handed back to the queue (re-sends the task).
        trainer_argv: the command that starts a trainer (default: ``settings.trainer_command``, else
            ``python -m worker.trainer``; tests substitute a fake one).
        backend: GPU readings for the watchdog and hygiene (default: :func:`worker.gpus.get_backend`).
        dispatch: called once the job has ended (the GPU room it held is free), e.g. a dispatch pass;
            its errors are logged, never raised.

    Returns:
        What happened; ``ran`` is False when this delivery found nothing to do.
    """
    settings = settings or get_settings()
    own_db = db is None
    db = db or Database(settings.database_url)
    storage = storage or LocalStorage(settings.storage_dir)
    publisher = EventPublisher(settings.redis_url)
    gpu = gpu or settings.worker_gpu
    if backend is None and gpu not in ("cpu", "any", ""):
        backend = get_backend(settings)
    try:
        outcome = Supervisor(
            job_id,
            settings,
            db,
            storage,
            owner=owner or default_owner(),
            gpu=gpu,
            publisher=publisher,
            requeue=requeue,
            trainer_argv=trainer_argv,
            backend=backend,
        ).run()
        if outcome.ran and dispatch is not None:
            try:
                dispatch()
            except Exception:  # the job's outcome stands; the janitor's pass dispatches later
                log.exception("job %s: dispatch after the job ended failed", job_id)
        return outcome
    finally:
        publisher.close()
        if own_db:
            db.dispose()
