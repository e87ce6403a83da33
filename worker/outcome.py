"""How one attempt of a job ended: the trainer's exit mapped to a job state, and the task's return value."""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from typing import Any

from core.exitcodes import ExitCode
from core.states import CANCELLED, FAILED, SUCCEEDED

MEMORY_BUDGET_EXCEEDED = "memory_budget_exceeded"
#: The supervisor killed the trainer for holding more host memory than trainer_memory_bytes.
HOST_MEMORY_EXCEEDED = "host_memory_exceeded"
#: The event recorded when a job out of GPU budget is requeued at its measured peak (once per job).
RESIZED_EVENT = "resized"
#: The trainer died of a signal gpuyard did not send (most often the kernel's OOM killer's SIGKILL).
TRAINER_KILLED = "trainer_killed"


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
