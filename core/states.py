"""Job states, spelled once (as ``celery/states.py`` does it): the constants and the sets they form.

::

    queued ──dispatch──▶ queued+dispatched ──take_lease──▶ running ──▶ succeeded | failed | cancelled | interrupted
      ▲                                                       │
      └─────────── requeue (lease expired, handed back) ──────┘

``failed`` is the job's own fault (bad spec, out of memory, time limit); ``interrupted`` the
infrastructure's (worker lost, attempts exhausted, queue unreachable).
"""

from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"
#: A study's trial stopped early by its pruner or a health finding (worker/studies.py): model and history kept.
PRUNED = "pruned"

#: Every state, in the order a job passes through them.
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED, PRUNED)
#: States a job can still leave: it holds a place in the queue or on a GPU.
ACTIVE_STATES = (QUEUED, RUNNING)
#: States a job never leaves.
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED, PRUNED)
