"""Usage accounting: each job attempt's GPU time (``job_attempts``), per user, day, GPU; quotas.

An attempt row is opened in the transaction that takes the job's lease and closed in the one that ends the
attempt (finished, handed back, preempted, or requeued by the janitor), so GPU-seconds come from the record
of what ran, never from a counter a restart could lose or repeat. GPU-seconds are ``memory_fraction ×``
seconds held (a whole GPU for an hour is 3600; a 0.5 job for an hour is 1800); GPU-hours are those ÷ 3600.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from store.base import StoreBase
from store.tables import Job, JobAttempt, User, utcnow

#: What ``GET /v1/usage`` may group by.
GROUP_BY = ("user", "day", "gpu", "study")
NO_STUDY = "-"  # the key of jobs submitted on their own, in usage by study
#: The periods a quota may count over.
QUOTA_PERIODS = {"week": dt.timedelta(days=7), "month": dt.timedelta(days=30)}


def open_attempt(s: Session, job: Job, now: dt.datetime) -> None:
    """Record that ``job`` (just leased) starts an attempt now, on ``job.gpu``."""
    raw = (job.spec or {}).get("resources") or {}
    fraction = raw.get("memory_fraction")
    s.add(
        JobAttempt(
            job_id=job.id,
            owner_id=job.owner_id,
            attempt=job.attempts,
            gpu=job.gpu,
            memory_fraction=float(fraction) if isinstance(fraction, int | float) else 1.0,
            started_at=now,
        )
    )


def close_attempt(s: Session, job_id: str, ended_at: dt.datetime, outcome: str) -> None:
    """Close the job's open attempt (if any) at ``ended_at`` with ``outcome``."""
    s.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
        .values(ended_at=ended_at, outcome=outcome)
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class UsageRow:
    """GPU time of one group (a user, a day, a GPU) in a window."""

    key: str
    gpu_seconds: float
    attempts: int

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600.0


@dataclass(frozen=True)
class Quota:
    """A user's GPU-hour quota and what they used of it in the current period."""

    gpu_hours: float | None
    period: str | None
    used_gpu_hours: float

    @property
    def over(self) -> bool:
        return self.gpu_hours is not None and self.used_gpu_hours >= self.gpu_hours


def _overlap_s(start: dt.datetime, end: dt.datetime, lo: dt.datetime, hi: dt.datetime) -> float:
    return max(0.0, (min(end, hi) - max(start, lo)).total_seconds())


def split_by_day(start: dt.datetime, end: dt.datetime) -> Iterable[tuple[str, float]]:
    """``(YYYY-MM-DD, seconds)`` of ``[start, end)`` on each UTC day it touches."""
    day = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
    while day < end:
        following = day + dt.timedelta(days=1)
        seconds = _overlap_s(start, end, day, following)
        if seconds > 0:
            yield day.date().isoformat(), seconds
        day = following


class UsageStore(StoreBase):
    """GPU usage from the recorded attempts, and GPU-hour quotas."""

    def usage(
        self,
        start: dt.datetime,
        end: dt.datetime,
        group_by: str = "user",
        *,
        owner_id: int | None = None,
        now: dt.datetime | None = None,
    ) -> list[UsageRow]:
        """GPU-seconds of the attempts on GPUs within ``[start, end)``, grouped by ``group_by``.

        Raises:
            ValueError: ``group_by`` is not one of :data:`GROUP_BY`, or ``end`` is before ``start``.
        """
        if group_by not in GROUP_BY:
            raise ValueError(f"Expected group_by among {', '.join(GROUP_BY)}. Received: group_by={group_by!r}")
        if end < start:
            raise ValueError(f"Expected from <= to. Received: from={start.isoformat()}, to={end.isoformat()}")
        now = now or utcnow()
        seconds: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        rows = self._attempts_within(start, end, owner_id)
        for attempt, user_name, study_id in rows:
            lo, hi = max(attempt.started_at, start), min(attempt.ended_at or now, end, now)
            if hi <= lo:
                continue
            if group_by == "day":
                parts = list(split_by_day(lo, hi))
            else:
                key = {"user": user_name, "gpu": str(attempt.gpu), "study": study_id or NO_STUDY}[group_by]
                parts = [(key, (hi - lo).total_seconds())]
            for key, held in parts:
                seconds[key] += attempt.memory_fraction * held
                counts[key] += 1
        return [UsageRow(key, round(seconds[key], 3), counts[key]) for key in sorted(seconds)]

    def _attempts_within(
        self, start: dt.datetime, end: dt.datetime, owner_id: int | None
    ) -> list[tuple[JobAttempt, str, str | None]]:
        """The GPU attempts that overlap ``[start, end)``, each with its user's name and its job's study."""
        query = (
            select(JobAttempt, User.name, Job.study_id)
            .join(User, User.id == JobAttempt.owner_id)
            .join(Job, Job.id == JobAttempt.job_id)
            .where(
                JobAttempt.gpu.is_not(None),
                JobAttempt.gpu != "cpu",
                JobAttempt.started_at < end,
                or_(JobAttempt.ended_at.is_(None), JobAttempt.ended_at > start),
            )
        )
        if owner_id is not None:
            query = query.where(JobAttempt.owner_id == owner_id)
        with self._begin() as s:
            return [(attempt, name, study) for attempt, name, study in s.execute(query).all()]

    def usage_by_user_and_day(
        self, start: dt.datetime, end: dt.datetime, *, owner_id: int | None = None, now: dt.datetime | None = None
    ) -> dict[str, dict[str, float]]:
        """``{user: {day: gpu_seconds}}`` in ``[start, end)`` (the dashboard's stacked chart)."""
        now = now or utcnow()
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        rows = self._attempts_within(start, end, owner_id)
        for attempt, user_name, _study in rows:
            lo, hi = max(attempt.started_at, start), min(attempt.ended_at or now, end, now)
            for day, held in split_by_day(lo, hi) if hi > lo else ():
                out[user_name][day] += attempt.memory_fraction * held
        return {user: dict(days) for user, days in out.items()}

    def gpu_seconds_by_user(self, now: dt.datetime | None = None) -> dict[str, float]:
        """All GPU-seconds ever recorded, per user name (``gpuyard_gpu_seconds_total``)."""
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        now = now or utcnow()
        return {row.key: row.gpu_seconds for row in self.usage(epoch, now, "user", now=now)}

    def preemptions_total(self) -> int:
        """How many times jobs were preempted (``gpuyard_preemptions_total``)."""
        with self._begin() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Job.preemptions), 0))) or 0)

    # ── quotas ──
    def set_quota(self, name: str, gpu_hours: float | None, period: str = "month") -> User | None:
        """Set ``name``'s GPU-hour quota per ``period`` (None: no quota); None when there is no such user.

        Raises:
            ValueError: a negative quota or an unknown period.
        """
        if period not in QUOTA_PERIODS:
            raise ValueError(f"Expected a period among {', '.join(QUOTA_PERIODS)}. Received: period={period!r}")
        if gpu_hours is not None and gpu_hours < 0:
            raise ValueError(f"Expected gpu_hours >= 0. Received: gpu_hours={gpu_hours}")
        with self._begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None:
                user.quota_gpu_hours = gpu_hours
                user.quota_period = period if gpu_hours is not None else None
            return user

    def quota_of(self, user: User, now: dt.datetime | None = None) -> Quota:
        """``user``'s quota and their use in the period that ends now."""
        now = now or utcnow()
        period = user.quota_period or "month"
        rows = self.usage(now - QUOTA_PERIODS[period], now, "user", owner_id=user.id, now=now)
        used = sum(r.gpu_seconds for r in rows) / 3600.0
        return Quota(user.quota_gpu_hours, user.quota_period if user.quota_gpu_hours is not None else None, used)

    def over_quota_users(self, now: dt.datetime | None = None) -> set[int]:
        """The ids of the users who have used their whole quota in its period."""
        with self._begin() as s:
            users = list(s.scalars(select(User).where(User.quota_gpu_hours.is_not(None))))
        return {u.id for u in users if self.quota_of(u, now).over}
