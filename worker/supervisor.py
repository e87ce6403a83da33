"""Runs one job for a Celery task: lease, trainer process group, event relay, cancel, time limit, outcome.

``supervise(job_id)`` is the whole of the ``gpuyard.train`` task and is what tests call directly::

    take_lease ─ none: another delivery holds the job (or it is finished/cancelled) → return, do nothing
      │
    stage: spec.json and the data set path; --resume when attempt > 1 or the job was preempted, and a checkpoint exists
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
import queue
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.atomicio import atomic_write_json
from core.exitcodes import ExitCode
from core.hostmem import trainer_memory_limit
from core.names import CHECKPOINT_DIR, CHECKPOINT_STATE, DATASET_SUMMARY_FILE, PID_FILE, SPEC_FILE, TRAINER_LOG
from core.settings import Settings, get_settings
from core.states import CANCELLED, FAILED
from core.trainer import FAILED_EVENT, trainer_argv, trainer_command
from models.spec import resources_of
from store import Database, Job
from store.errors import JobDBError
from worker import procs, warm
from worker.endings import Endings
from worker.gpus import (
    GpuBackend,
    budget_bytes,
    context_allowance_bytes,
    declare_fake_process_if_absent,
    get_backend,
)
from worker.lease import LeaseKeeper, default_owner
from worker.outcome import (
    HOST_MEMORY_EXCEEDED,
    LEASE_LOST,
    MEMORY_BUDGET_EXCEEDED,
    PREEMPTED,
    Outcome,
    decide_outcome,
)
from worker.relay import EventPublisher, progress_of
from worker.storage import LocalStorage, Storage
from worker.studies import TRIAL_EVENTS, observe_trial_event
from worker.watchdog import HostMemoryWatchdog, MemoryWatchdog, hygiene_problem

CANCELLED_REASON = ExitCode.CANCELLED.reason
_HOST_MEMORY_INTERVAL_S = 0.5


log = logging.getLogger(__name__)


# How long after the trainer's exit we wait for its stdout to close (a grandchild may hold it open).
_EOF_WAIT_S = 2.0


# ── pieces ────────────────────────────────────────────────────────────────────────────────────────────
# ── the supervisor ────────────────────────────────────────────────────────────────────────────────────
class Supervisor(Endings):
    """One delivery of one job. Use :func:`supervise`; the class only keeps the run's state together
    (how the attempt ends, recorded: :class:`worker.endings.Endings`)."""

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
            trainer_argv or shlex.split(settings.trainer_command) or trainer_command()
        )
        substituted = trainer_argv is not None or bool(settings.trainer_command)
        wanted = warm.slot_uses_warm_trainers(settings, gpu, substituted=substituted)
        self.warm_pool = warm.pool_for(settings, gpu, self.trainer_argv) if wanted else None
        self.backend = backend
        self.published_seq = 0
        self.failed_event: dict[str, Any] | None = None
        self.progress: dict[str, Any] = {}
        self.trial: tuple[str, int] | None = None  # (study id, trial number) of a study's trial
        self.watchdog: MemoryWatchdog | None = None
        self.gpu_total_bytes: int | None = None
        self.host_memory: HostMemoryWatchdog | None = None
        self.peak_rss_bytes = 0
        self.rewarm_backend: str | None = None  # the slot's next warm trainer, started after the first step
        self.preempted_by: str | None = None  # the job the dispatcher stopped this one for (worker/preemption.py)
        self.keeper: LeaseKeeper | None = None

    # ── top level ──
    def run(self) -> Outcome:
        taken_at = time.monotonic()
        job = self.db.take_lease(self.job_id, self.owner, self.settings.lease_seconds, gpu=self.gpu)
        if job is None:
            log.info("job %s: not taken (leased elsewhere, finished or cancelled); nothing to do", self.job_id)
            return Outcome(self.job_id, ran=False)
        self.published_seq = job.last_event_seq  # the state event of the lease comes right after
        if job.study_id is not None and job.trial_number is not None:
            self.trial = (job.study_id, job.trial_number)
        self._publish_db_events()
        lease_seconds = self.settings.lease_seconds
        keeper = LeaseKeeper(self.db, self.job_id, self.owner, lease_seconds, lease_seconds / 3, taken_at=taken_at)
        keeper.start()
        self.keeper = keeper
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
            return self._finish(job, CANCELLED, CANCELLED_REASON, "cancelled before the trainer started", None)
        data_path = self._stage_dataset(job, job_dir)
        if data_path is None:
            missing = "the job's data set was deleted or its file is missing from storage"
            return self._finish(job, FAILED, ExitCode.DATASET_INVALID.reason, missing, None)
        atomic_write_json(job_dir / SPEC_FILE, job.spec)
        # A preempted job's attempt is not counted, so its next one may be attempt 1 again: it resumes too.
        resume = (job.attempts > 1 or job.preemptions > 0) and (job_dir / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file()
        # A trainer orphaned by a dead worker on this host may still be writing its checkpoint.
        stale = procs.stop_stale_trainer(job_dir / PID_FILE, self.settings.cancel_grace_s)
        if stale is not None:
            log.warning("job %s: stopped trainer %d left by an earlier attempt", self.job_id, stale)

        argv = trainer_argv(
            spec=job_dir / SPEC_FILE,
            data=data_path,
            summary=job_dir / DATASET_SUMMARY_FILE,
            out=job_dir,
            gpu=self.gpu,
            resume=resume,
            command=self.trainer_argv,
        )
        proc = self._start_trainer(argv, job, job_dir, resume)
        procs.write_pid_file(job_dir / PID_FILE, proc.pid)
        unaccounted_before = self._start_watchdog(job, proc.pid)
        self.host_memory = HostMemoryWatchdog(
            proc.pid, trainer_memory_limit(self.settings), _HOST_MEMORY_INTERVAL_S, self.job_id
        )
        self.host_memory.start()
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
            self.host_memory.stop()
            # Kill whatever is left in the group (everything, after an exception in _watch; stragglers the
            # trainer left behind, otherwise) while the unreaped leader still pins the group id, then reap.
            procs.signal_group(proc.pid, signal.SIGKILL)
            self.peak_rss_bytes = max(procs.reap(proc), self.host_memory.peak_bytes)
            assert proc.stdout is not None
            proc.stdout.close()
        (job_dir / PID_FILE).unlink(missing_ok=True)
        self._rewarm()
        if self.watchdog is not None and self.watchdog.exceeded.is_set() and stop_reason != LEASE_LOST:
            stop_reason = MEMORY_BUDGET_EXCEEDED
        elif self.host_memory.exceeded.is_set() and stop_reason != LEASE_LOST:
            stop_reason = HOST_MEMORY_EXCEEDED
        self._check_hygiene(unaccounted_before)

        base: dict[str, Any] = {
            "job_id": self.job_id,
            "ran": True,
            "attempt": job.attempts,
            "resumed": resume,
            "trainer_pid": proc.pid,
            "exit_code": proc.returncode,
        }
        decision = decide_outcome(self._attempt_end(job, proc.returncode, stop_reason))
        return self._apply(job, decision, base, proc.returncode)

    def _start_trainer(self, argv: list[str], job: Job, job_dir: Path, resume: bool) -> subprocess.Popen[bytes]:
        """The job's trainer: the slot's warm one when it fits (worker/warm.py), else a cold start."""
        backend = resources_of(job.spec).backend
        proc = self.warm_pool.take(backend, start_next=False) if self.warm_pool is not None else None
        self.rewarm_backend = backend if self.warm_pool is not None else None
        started = "warm trainer" if proc is not None else "cold start"
        log_path = job_dir / TRAINER_LOG
        with log_path.open("ab") as log_file:
            header = (
                f"\n=== gpuyard attempt {job.attempts} on {socket.gethostname()} at "
                f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}, {started}"
                f"{' (resuming from checkpoint)' if resume else ''} ===\n"
            )
            log_file.write(header.encode())
            log_file.flush()
            if proc is not None:
                try:
                    warm.hand_over(proc, [*argv[len(self.trainer_argv) :], "--backend", backend], log_path, job_dir)
                    return proc
                except OSError as exc:  # it died after take() looked: kill what is left, start cold
                    log.warning("job %s: warm trainer %d gone (%s); starting cold", self.job_id, proc.pid, exc)
                    warm.WarmTrainer(proc, backend, self.gpu, "").discard()
            return subprocess.Popen(
                procs.launcher_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,  # its own process group: we signal the group, never the worker
                env=procs.trainer_env(self.settings),
                cwd=job_dir,
            )

    def _rewarm(self) -> None:
        """Start the slot's next warm trainer (once per job: after its first step, or when it ended)."""
        if self.warm_pool is not None and self.rewarm_backend is not None:
            backend, self.rewarm_backend = self.rewarm_backend, None
            try:
                self.warm_pool.start(backend)
            except OSError as exc:  # the next job starts cold; this one is not affected
                log.warning("cannot start a warm trainer: %s", exc)

    # ── staging ──
    def _stage_dataset(self, job: Job, job_dir: Path) -> Path | None:
        """The local path of the job's data set (LocalStorage: in place; remote storage would copy here),
        with the summary its upload check stored written beside the spec, for the trainer to trust."""
        if job.dataset_id is None:
            return None
        dataset = self.db.get_dataset(job.dataset_id)
        if dataset is None:
            return None
        path = self.storage.local_path(dataset.storage_key)
        if not path.is_file():
            return None
        atomic_write_json(job_dir / DATASET_SUMMARY_FILE, dataset.summary)
        return path

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
        fraction = resources_of(job.spec).fraction
        self.gpu_total_bytes = info.memory_total_bytes
        budget = budget_bytes(fraction, info.memory_total_bytes, context_allowance_bytes(self.settings))
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
            target=procs.read_lines, args=(proc.stdout, events), daemon=True, name=f"events-{self.job_id}"
        )
        reader.start()
        grace = self.settings.cancel_grace_s
        poll = self.settings.cancel_poll_s
        started = time.monotonic()
        max_runtime = resources_of(job.spec).max_runtime_s
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
            if stop_reason is None and keeper.expired():
                # Fenced: past the lease (a frozen host waking up) the job may be another's; nothing more
                # is relayed or recorded, and the trainer dies before it writes another checkpoint.
                stop_reason = LEASE_LOST
                procs.signal_group(proc.pid, signal.SIGKILL)
            if item is procs.EOF:
                eof = True
            elif item is not None and stop_reason != LEASE_LOST:
                self._relay(item)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + poll
                if stop_reason is None:
                    stop_reason = self._stop_reason(keeper, deadline, now)
                    if stop_reason in (LEASE_LOST, MEMORY_BUDGET_EXCEEDED):
                        procs.signal_group(proc.pid, signal.SIGKILL)  # someone else may own the job now
                    elif stop_reason is not None:
                        log.info("job %s: stopping trainer (%s)", self.job_id, stop_reason)
                        procs.signal_group(proc.pid, signal.SIGTERM)
                        kill_at = now + grace
                if kill_at is not None and now >= kill_at and not procs.has_exited(proc):
                    log.warning("job %s: trainer ignored SIGTERM for %.1f s; killing it", self.job_id, grace)
                    procs.signal_group(proc.pid, signal.SIGKILL)
                    kill_at = None
            if procs.has_exited(proc):
                exited_at = exited_at or now
                if eof or now - exited_at > _EOF_WAIT_S:
                    break
        reader.join(timeout=1)
        while True:  # events read after the loop ended
            try:
                item = events.get_nowait()
            except queue.Empty:
                break
            if item is not procs.EOF and stop_reason != LEASE_LOST:
                self._relay(item)
        return stop_reason

    def _stop_reason(self, keeper: LeaseKeeper, deadline: float | None, now: float) -> str | None:
        if keeper.expired():
            return LEASE_LOST
        if self.watchdog is not None and self.watchdog.exceeded.is_set():
            return MEMORY_BUDGET_EXCEEDED  # the watchdog already killed the group
        if self.host_memory is not None and self.host_memory.exceeded.is_set():
            return HOST_MEMORY_EXCEEDED  # the host-memory watchdog already killed the group
        try:
            cancel, preempted_by = self.db.stop_request(self.job_id)
            if cancel:
                return CANCELLED_REASON
            if preempted_by is not None:
                self.preempted_by = preempted_by
                return PREEMPTED
        except JobDBError as exc:
            log.warning("job %s: cannot read the cancel and preempt flags: %s", self.job_id, exc)
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
        if self.trial is not None and kind in TRIAL_EVENTS:
            self._observe_trial(event)
        if kind == FAILED_EVENT:
            self.failed_event = event
        elif kind in ("batch", "epoch_end"):
            self._rewarm()
        try:
            seq = self.db.append_event(self.job_id, event)
            progress = progress_of(event)
            if progress:
                self.progress.update(progress)
                self.db.record_progress(self.job_id, dict(self.progress), owner=self.owner)
        except JobDBError as exc:
            log.warning("job %s: cannot store %s event: %s", self.job_id, kind, exc)
            self.publisher.publish(self.job_id, event)
            return
        self.published_seq = max(self.published_seq, seq)
        self.publisher.publish(self.job_id, {"seq": seq, **event})

    def _observe_trial(self, event: dict[str, Any]) -> None:
        """A study's trial: the epoch's objective to Optuna, a prune request when the pruner or a health
        finding says so (worker/studies.py); the cancel poll then stops the trainer."""
        assert self.trial is not None
        try:
            observe_trial_event(self.db, self.job_id, *self.trial, event)
        except Exception:  # the trial goes on unpruned; the job itself must not suffer
            log.exception("job %s: cannot report the trial's %s event to its study", self.job_id, event.get("event"))

    # ── events ──
    def _publish_db_events(self) -> None:
        """Publish the DB's own events (state changes) that we have not published yet."""
        for stored in self.db.events_since(self.job_id, self.published_seq):
            self.publisher.publish(self.job_id, {"seq": stored.seq, **stored.event})
            self.published_seq = stored.seq


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
    assert settings.storage_dir is not None  # filled in by Settings
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
