"""Who goes first among the waiting jobs: priority, aging and each user's recent GPU usage (pure).

The policy, as the README states it:

1. **Priority, raised by waiting.** A job's effective priority is its ``priority`` plus one for every
   ``queue_aging_s`` it has waited, so a low-priority job eventually outranks anything that arrives later
   and nothing starves.
2. **Fair share within an effective priority.** The user whose *share* is smallest goes first, where
   share = the GPU fraction the user holds right now (running and dispatched jobs, plus the jobs already
   ordered ahead in this pass) + the user's recent usage ÷ the half-life. Recent usage is GPU fraction ×
   seconds, each second weighted ``2^(−age / half_life)``, so ``usage ÷ half_life`` reads as "the GPU
   fraction held on average lately". One person's 50 queued jobs therefore interleave with a colleague's
   one instead of going first.
3. **FIFO last**: equal shares go by submission time, then id.

Placement (which GPU, and the rule that a waiting job at the head of the line is not overtaken on its
GPUs) is :func:`worker.placement.plan_dispatch`'s; this module only orders.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True)
class FairPolicy:
    """The knobs of the order (``Settings.fair_share_half_life_s`` and ``queue_aging_s``)."""

    half_life_s: float = 7200.0
    aging_s: float = 14400.0


@dataclass(frozen=True)
class UsageSpan:
    """One stretch of GPU holding by one user: ``fraction`` from ``start`` to ``end`` (None: still held)."""

    owner_id: int
    fraction: float
    start: dt.datetime
    end: dt.datetime | None = None


def decayed_usage(spans: Iterable[UsageSpan], now: dt.datetime, half_life_s: float) -> dict[int, float]:
    """Each user's GPU fraction × seconds, every second weighted ``2^(−(now − t) / half_life_s)``.

    The integral of ``fraction · 2^(−(now−t)/H)`` over ``[start, end]`` is
    ``fraction · H/ln 2 · (2^(−(now−end)/H) − 2^(−(now−start)/H))``.
    """
    usage: dict[int, float] = defaultdict(float)
    rate = math.log(2) / half_life_s
    for span in spans:
        end = min(span.end or now, now)
        if end <= span.start:
            continue
        age_end = (now - end).total_seconds()
        age_start = (now - span.start).total_seconds()
        usage[span.owner_id] += span.fraction / rate * (math.exp(-rate * age_end) - math.exp(-rate * age_start))
    return dict(usage)


class Waiting(Protocol):
    """What ordering needs of a waiting job."""

    @property
    def id(self) -> str: ...
    @property
    def owner_id(self) -> int: ...
    @property
    def fraction(self) -> float: ...
    @property
    def priority(self) -> int: ...
    @property
    def queued_at(self) -> dt.datetime: ...


W = TypeVar("W", bound=Waiting)


def effective_priority(job: Waiting, now: dt.datetime, policy: FairPolicy) -> int:
    """``priority`` plus one per ``aging_s`` waited."""
    waited = max(0.0, (now - job.queued_at).total_seconds())
    return job.priority + int(waited // policy.aging_s)


def fair_order(
    waiting: Sequence[W],
    *,
    held: dict[int, float],
    usage: dict[int, float],
    now: dt.datetime,
    policy: FairPolicy,
) -> list[W]:
    """The dispatch order of ``waiting`` (see the module docstring).

    Args:
        waiting: the jobs not yet placed, any order.
        held: each user's GPU fraction held now (running and dispatched jobs).
        usage: :func:`decayed_usage` of each user.
        now: the time the order is for (aging).
        policy: half-life and aging step.
    """
    share = {owner: held.get(owner, 0.0) + usage.get(owner, 0.0) / policy.half_life_s for owner in {*held, *usage}}
    lines: dict[int, list[tuple[int, dt.datetime, str, W]]] = defaultdict(list)
    for job in waiting:
        lines[job.owner_id].append((-effective_priority(job, now, policy), job.queued_at, job.id, job))
    for line in lines.values():
        line.sort(key=lambda item: item[:3], reverse=True)  # the user's best job last: pop() takes it
    order: list[W] = []
    while lines:
        owner = min(lines, key=lambda o: (lines[o][-1][0], share.get(o, 0.0), lines[o][-1][1], lines[o][-1][2]))
        job = lines[owner].pop()[3]
        order.append(job)
        share[owner] = share.get(owner, 0.0) + job.fraction
        if not lines[owner]:
            del lines[owner]
    return order
