"""Job states, spelled once (as ``celery/states.py`` does it): the enum and the sets it forms.

::

    queued ──dispatch──▶ queued+dispatched ──take_lease──▶ running ──▶ succeeded | failed | cancelled | interrupted
      ▲                                                       │
      └─────────── requeue (lease expired, handed back) ──────┘

``failed`` is the job's own fault (bad spec, out of memory, time limit); ``interrupted`` the
infrastructure's (worker lost, attempts exhausted, queue unreachable).

:class:`JobState` is a ``StrEnum``: each member *is* its string (``JobState.QUEUED == "queued"``), so the
wire, the database and every comparison with a plain string are unchanged. The module-level names
(``QUEUED`` … ``INTERRUPTED``) are the same members, kept so callers import them as before.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """A job's state; the value is what the API answers and the database stores."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        """Whether a job never leaves this state."""
        return self in TERMINAL_STATES


QUEUED = JobState.QUEUED
RUNNING = JobState.RUNNING
SUCCEEDED = JobState.SUCCEEDED
FAILED = JobState.FAILED
CANCELLED = JobState.CANCELLED
INTERRUPTED = JobState.INTERRUPTED

#: Every state, in the order a job passes through them.
JOB_STATES: tuple[JobState, ...] = tuple(JobState)
#: States a job can still leave: it holds a place in the queue or on a GPU.
ACTIVE_STATES: tuple[JobState, ...] = (QUEUED, RUNNING)
#: States a job never leaves.
TERMINAL_STATES: tuple[JobState, ...] = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)
