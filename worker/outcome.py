"""How one attempt of a job ended: the facts of its end, the decision they lead to, the task's return value.

Decide, then apply: :func:`decide_outcome` is a pure function of :class:`AttemptEnd` (the trainer's exit, why
the supervisor stopped it, what the watchdogs saw, the job's history) returning one typed decision; the
supervisor (worker/supervisor.py) only runs the trainer and applies it:

* :class:`FinishDecision`: the job ends ``succeeded``, ``failed`` or ``cancelled``;
* :class:`RequeueDecision`: handed back to the queue, the attempt counted; the next one resumes from
  the checkpoint (a signal gpuyard did not send, a SIGKILL below ``trainer_kills_before_oom``);
* :class:`ResizeDecision`: out of its GPU budget: requeued once at the measured peak plus margin;
* :class:`PreemptedDecision`: stopped for a higher-priority job: queued again, the attempt NOT counted;
* :class:`LeaseLostDecision`: another delivery may own the job now: nothing is recorded.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from typing import Any

from core.exitcodes import ExitCode
from core.states import CANCELLED, FAILED, SUCCEEDED
from worker.gpus import fraction_for

MEMORY_BUDGET_EXCEEDED = "memory_budget_exceeded"
#: The supervisor killed the trainer for holding more host memory than trainer_memory_bytes.
HOST_MEMORY_EXCEEDED = "host_memory_exceeded"
#: The event recorded when a job out of GPU budget is requeued at its measured peak (once per job).
RESIZED_EVENT = "resized"
#: The trainer died of a signal gpuyard did not send (most often the kernel's OOM killer's SIGKILL).
TRAINER_KILLED = "trainer_killed"
#: The supervisor stopped the trainer because the dispatcher preempted the job (worker/preemption.py).
PREEMPTED = "preempted"
#: The event a preempted job records when it is back in the queue (by which job, what it had done).
PREEMPTED_EVENT = "preempted"
#: The supervisor no longer holds the job's lease: it stops and records nothing.
LEASE_LOST = "lease_lost"


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
    if stop_reason == ExitCode.CANCELLED.reason:
        return CANCELLED, ExitCode.CANCELLED.reason, "cancelled on request"
    if stop_reason == "time_limit":
        return FAILED, ExitCode.TIME_LIMIT.reason, detail or "the job ran past its max_runtime_s"
    if stop_reason == MEMORY_BUDGET_EXCEEDED:
        return FAILED, MEMORY_BUDGET_EXCEEDED, "the job used more GPU memory than its memory_fraction allows"
    if stop_reason == HOST_MEMORY_EXCEEDED:
        return FAILED, ExitCode.OUT_OF_MEMORY.reason, "the trainer held more host memory than it may"
    if exit_code < 0:
        # A signal gpuyard did not send: an interruption, like a lost worker. Hand the job back; its next
        # attempt resumes from the checkpoint (the supervisor fails it out_of_memory when it repeats).
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        hint = " (the kernel's OOM killer does this when the host runs out of memory)"
        return (
            None,
            TRAINER_KILLED,
            f"the trainer was killed by {name}" + (hint if -exit_code == signal.SIGKILL else ""),
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


# ── decide ────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class AttemptEnd:
    """Everything :func:`decide_outcome` needs to know of one ended attempt (no process, no database).

    Args:
        exit_code: ``Popen.returncode`` (negative: killed by that signal).
        stop_reason: why the supervisor stopped it (``cancelled``, ``time_limit``, ``preempted``,
            ``lease_lost``, a watchdog's reason) or None.
        failed_detail: the detail of the trainer's last ``failed`` event, if any.
        cancel_requested: a cancel was asked for (perhaps after the last poll).
        preempted_by: the job the dispatcher stopped this one for, when preempted.
        gpu_watched: a GPU memory watchdog ran (the job ran on a GPU with readings).
        gpu_peak_bytes / gpu_exceeded_bytes / gpu_budget_bytes / gpu_total_bytes: the watchdog's figures.
        host_exceeded_bytes / host_limit_bytes: the host-memory watchdog's figures.
        peak_rss_bytes: the trainer group's peak host memory.
        kills_in_a_row: how many of the job's latest hand-backs, in a row, were SIGKILLs nobody sent.
        kills_before_oom: ``Settings.trainer_kills_before_oom``.
        memory_fraction: the job's memory_fraction this attempt.
        attempts / max_attempts: the attempt number and the job's limit.
        resized_before: the job was resized once already.
        allowance_bytes / memory_margin / fraction_limit: the budget formula's knobs
            (``context_allowance_bytes``, ``memory_margin``, the most one job may hold of a GPU).
    """

    exit_code: int
    stop_reason: str | None = None
    failed_detail: str | None = None
    cancel_requested: bool = False
    preempted_by: str | None = None
    gpu_watched: bool = False
    gpu_peak_bytes: int = 0
    gpu_exceeded_bytes: int | None = None
    gpu_budget_bytes: int | None = None
    gpu_total_bytes: int | None = None
    host_exceeded_bytes: int | None = None
    host_limit_bytes: int | None = None
    peak_rss_bytes: int = 0
    kills_in_a_row: int = 0
    kills_before_oom: int = 3
    memory_fraction: float = 1.0
    attempts: int = 1
    max_attempts: int = 3
    resized_before: bool = False
    allowance_bytes: int = 0
    memory_margin: float = 1.2
    fraction_limit: float = 1.0


@dataclass(frozen=True)
class FinishDecision:
    """End the job in a terminal state (``succeeded``, ``failed``, ``cancelled``)."""

    state: str
    reason: str | None
    detail: str | None


@dataclass(frozen=True)
class RequeueDecision:
    """Hand the job back to the queue; the attempt counts, the next one resumes from the checkpoint."""

    reason: str
    detail: str | None


@dataclass(frozen=True)
class ResizeDecision:
    """Requeue once at a larger ``memory_fraction`` (the measured peak plus margin); the attempt counts."""

    reason: str
    detail: str
    memory_fraction_from: float
    memory_fraction: float
    peak_gpu_memory_bytes: int

    def event(self) -> dict[str, Any]:
        """The ``resized`` event the job records."""
        return {
            "event": RESIZED_EVENT,
            "memory_fraction_from": self.memory_fraction_from,
            "memory_fraction": self.memory_fraction,
            "peak_gpu_memory_bytes": self.peak_gpu_memory_bytes,
        }


@dataclass(frozen=True)
class PreemptedDecision:
    """Queue the job again for the preemptor ``by``; its attempt is not counted, ``preemptions`` + 1."""

    by: str | None
    detail: str


@dataclass(frozen=True)
class LeaseLostDecision:
    """Record nothing: the lease is gone, another delivery may own the job."""


Decision = FinishDecision | RequeueDecision | ResizeDecision | PreemptedDecision | LeaseLostDecision


def decide_outcome(end: AttemptEnd) -> Decision:
    """What to do with a job whose attempt ended as ``end`` says (pure; see the module docstring)."""
    if end.stop_reason == LEASE_LOST:
        return LeaseLostDecision()
    stop_reason = end.stop_reason
    if stop_reason is None and end.exit_code != 0 and end.cancel_requested:
        stop_reason = ExitCode.CANCELLED.reason  # asked between the last poll and the trainer's exit
    if stop_reason == PREEMPTED and end.exit_code != ExitCode.SUCCEEDED:
        if end.cancel_requested:
            return FinishDecision(CANCELLED, ExitCode.CANCELLED.reason, "cancelled on request")
        return PreemptedDecision(
            end.preempted_by, f"preempted by {end.preempted_by or 'a higher-priority job'}; resumes from its checkpoint"
        )
    failed = {"detail": end.failed_detail} if end.failed_detail else None
    state, reason, detail = classify_exit(end.exit_code, stop_reason, failed)
    if reason == MEMORY_BUDGET_EXCEEDED and end.gpu_budget_bytes is not None:
        detail = (
            f"the job held {_mib(end.gpu_exceeded_bytes)} of GPU memory, over its budget of "
            f"{_mib(end.gpu_budget_bytes)} (memory_fraction × the GPU's total + "
            f"{_mib(end.allowance_bytes)} allowance); killed. Ask for a larger "
            "resources.memory_fraction or make the model smaller"
        )
    if stop_reason == HOST_MEMORY_EXCEEDED:
        detail = (
            f"the trainer held {_mib(end.host_exceeded_bytes)} of host memory, over its limit of "
            f"{_mib(end.host_limit_bytes)} (trainer_memory_bytes); killed. Make the model or "
            "batch_size smaller"
        )
    if reason == TRAINER_KILLED and end.exit_code == -signal.SIGKILL:
        kills = end.kills_in_a_row + 1
        if kills >= end.kills_before_oom:
            state, reason = FAILED, ExitCode.OUT_OF_MEMORY.reason
            detail = (
                f"the trainer was killed by SIGKILL {kills} times in a row, most likely by the kernel's "
                f"OOM killer: the host ran out of memory. Its peak was {_mib(end.peak_rss_bytes)} of host "
                "memory; make the model or batch_size smaller"
            )
        else:
            detail = f"{detail}; peak {_mib(end.peak_rss_bytes)} of host memory; resuming from the checkpoint"
    out_of_gpu_memory = reason == MEMORY_BUDGET_EXCEEDED or (
        stop_reason is None and end.exit_code == ExitCode.OUT_OF_MEMORY and reason == ExitCode.OUT_OF_MEMORY.reason
    )
    if state == FAILED and end.gpu_watched and out_of_gpu_memory:
        return decide_resize(end, reason, detail)
    if state is None:
        return RequeueDecision(reason, detail)
    return FinishDecision(state, None if state == SUCCEEDED else reason, detail)


def decide_resize(end: AttemptEnd, reason: str, detail: str | None) -> ResizeDecision | FinishDecision:
    """A job out of its GPU budget: requeued once at its measured peak plus margin (at least double, up to
    the limit) when that fits a GPU and it has attempts left; else failed, naming the fraction to ask for."""
    peak = max(end.gpu_peak_bytes, end.gpu_exceeded_bytes or 0)
    total = end.gpu_total_bytes
    if not peak or not total:
        return FinishDecision(FAILED, reason, detail)
    old = end.memory_fraction
    limit = end.fraction_limit
    # Stopped at its budget, the job may have wanted more than it reached: at least double, up to the limit.
    new = max(fraction_for(peak, total, end.allowance_bytes, end.memory_margin), min(2 * old, limit))
    if end.resized_before or new > limit + 1e-9 or end.attempts >= end.max_attempts:
        if end.resized_before:
            why = "it was resized once already"
        elif new > limit + 1e-9:
            why = f"more than a GPU's jobs may hold ({limit:g})"
        else:
            why = f"it has no attempts left ({end.attempts} of {end.max_attempts})"
        return FinishDecision(
            FAILED,
            reason,
            f"{detail}; it needs memory_fraction ≥ {new:g}, {why}: ask for it, or make the model smaller",
        )
    return ResizeDecision(
        reason,
        f"{detail}; requeued once at memory_fraction {new:g} (peak {_mib(peak)} + margin), resuming from "
        "its checkpoint",
        old,
        new,
        peak,
    )


def _mib(value: int | None) -> str:
    return f"{(value or 0) / 2**20:.0f} MiB"
