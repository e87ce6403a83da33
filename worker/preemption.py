"""Preemption, decided: which running jobs a waiting job may stop to get room (pure; the dispatcher applies).

Vocabulary: a *claimant* is a waiting job that fits on no GPU now; a *holder* is a job holding room on a GPU;
a *victim* is a holder the plan stops. :func:`plan_preemption` returns at most one :class:`Preemption` per
dispatch pass (one claimant, one GPU, its victims) or None. The dispatcher (worker/dispatch.py) marks the
victims (``jobs.preempted_by``); each victim's supervisor sees the mark in its watch loop, SIGTERMs the
trainer, which checkpoints and exits, and queues the job again without counting the attempt
(worker/outcome.py :class:`~worker.outcome.PreemptedDecision`). The claimant is placed by the dispatch pass
that follows the victims' release: it is first in line for that GPU.

The rule, with its guards (``Settings.preemption``, ``preempt_after_s``, ``preempt_min_run_s``):

* nothing while any earlier preemption is still stopping its victims (no double stops, no churn);
* a claimant preempts only after waiting ``preempt_after_s``, and never when its owner is over quota;
* a victim runs on one of the claimant's GPUs, has a strictly lower ``priority`` than the claimant's
  (aging orders the queue but does not preempt: equal priorities never stop each other), is preemptible
  (``resources.preemptible``), has run ``preempt_min_run_s`` and was not preempted in the last
  ``preempt_min_run_s``;
* victims are taken in order (over quota first, lowest priority, least work lost, most recently started)
  until the claimant fits, then any the others suffice without are dropped: never more than needed;
* a GPU where even every eligible victim frees too little is not touched; among the GPUs that work, the
  fewest victims, then the least work lost, wins.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PreemptPolicy:
    """The switch and guards (``Settings.preemption``, ``preempt_after_s``, ``preempt_min_run_s``)."""

    enabled: bool = True
    after_s: float = 300.0
    min_run_s: float = 120.0


@dataclass(frozen=True)
class Claimant:
    """A waiting job that fits nowhere now, with the GPUs it could run on (online, its backend, its request)."""

    id: str
    priority: int
    queued_at: dt.datetime
    gpus: tuple[str, ...]
    over_quota: bool = False


@dataclass(frozen=True)
class Holder:
    """A job holding room on a GPU. ``started_at`` None: dispatched, not started (never a victim)."""

    id: str
    gpu: str
    priority: int
    started_at: dt.datetime | None
    preemptible: bool = True
    preempted_at: dt.datetime | None = None
    stopping: bool = False  # a preemption already asked it to stop
    work_lost: float = 0.0  # what a stop now would lose: the batches its resume trains again
    over_quota: bool = False


@dataclass(frozen=True)
class Preemption:
    """Stop ``victims`` on ``gpu`` so that ``preemptor`` fits there."""

    preemptor: str
    gpu: str
    victims: tuple[str, ...]


#: ``fits(claimant, gpu, without)``: whether the claimant would fit on ``gpu`` if the ``without`` jobs were gone.
Fits = Callable[[Claimant, str, frozenset[str]], bool]


def may_be_victim(holder: Holder, claimant: Claimant, now: dt.datetime, policy: PreemptPolicy) -> bool:
    """Whether ``holder`` may be stopped for ``claimant`` now (the victim guards of the module docstring)."""
    if holder.started_at is None or holder.stopping or not holder.preemptible:
        return False
    if holder.priority >= claimant.priority:
        return False
    if (now - holder.started_at).total_seconds() < policy.min_run_s:
        return False
    return holder.preempted_at is None or (now - holder.preempted_at).total_seconds() >= policy.min_run_s


def victim_order(holder: Holder) -> tuple[bool, int, float, float]:
    """Who goes first: over quota, lowest priority, least work lost, most recently started."""
    started = holder.started_at.timestamp() if holder.started_at is not None else 0.0
    return (not holder.over_quota, holder.priority, holder.work_lost, -started)


def plan_preemption(
    claimants: Sequence[Claimant],
    holders: Sequence[Holder],
    *,
    fits: Fits,
    now: dt.datetime,
    policy: PreemptPolicy,
) -> Preemption | None:
    """The preemption this dispatch pass makes, or None (see the module docstring for the rule).

    Args:
        claimants: the waiting jobs that fit nowhere, in dispatch order (the first that can preempt does).
        holders: every job holding room on a GPU.
        fits: whether a claimant fits on a GPU without some holders (the dispatcher's placement rule).
        now: the time of the pass.
        policy: the switch and guards.
    """
    if not policy.enabled or any(h.stopping for h in holders):
        return None
    for claimant in claimants:
        if claimant.over_quota or (now - claimant.queued_at).total_seconds() < policy.after_s:
            continue
        options = []
        for gpu in claimant.gpus:
            victims = _victims_on(claimant, gpu, holders, fits, now, policy)
            if victims is not None:
                options.append(Preemption(claimant.id, gpu, tuple(v.id for v in victims)))
                options.sort(key=lambda p: _cost(p, holders))
        if options:
            return options[0]
    return None


def _victims_on(
    claimant: Claimant, gpu: str, holders: Sequence[Holder], fits: Fits, now: dt.datetime, policy: PreemptPolicy
) -> list[Holder] | None:
    eligible = sorted(
        (h for h in holders if h.gpu == gpu and may_be_victim(h, claimant, now, policy)), key=victim_order
    )
    chosen: list[Holder] = []
    for holder in eligible:
        chosen.append(holder)
        if fits(claimant, gpu, frozenset(h.id for h in chosen)):
            break
    else:
        return None  # even every eligible victim frees too little: no preemption here
    for holder in reversed(chosen[:-1]):  # never more than needed
        rest = [h for h in chosen if h is not holder]
        if fits(claimant, gpu, frozenset(h.id for h in rest)):
            chosen = rest
    return chosen


def _cost(preemption: Preemption, holders: Sequence[Holder]) -> tuple[int, float]:
    lost = sum(h.work_lost for h in holders if h.id in preemption.victims)
    return (len(preemption.victims), lost)
