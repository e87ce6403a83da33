"""Studies: their rows, the short lease that lets one process advance a study at a time, their trial jobs,
and the prune request that stops a trial like a cancel but ends it ``pruned``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update

from core.states import ACTIVE_STATES, RUNNING
from store.base import StoreBase, rowcount
from store.errors import ActiveJobLimit, UnknownDataset
from store.tables import STUDY_ACTIVE, STUDY_CANCELLED, STUDY_FINISHED, Dataset, Job, Study, User, new_id, utcnow


class StudiesStore(StoreBase):
    """Studies (``store.tables.Study``) and the study side of their trial jobs."""

    def create_study(
        self,
        owner_id: int,
        name: str,
        dataset_id: str,
        request: dict[str, Any],
        *,
        max_active: int,
        now: dt.datetime | None = None,
    ) -> Study:
        """Record a new active study, unless its owner already has ``max_active`` active studies.

        Raises:
            ActiveJobLimit: the owner is at the cap of active studies.
            UnknownDataset: the data set does not exist.
        """
        now = now or utcnow()
        with self._begin() as s:
            if self.is_postgres:
                s.execute(select(User.id).where(User.id == owner_id).with_for_update())
            s.execute(update(User).where(User.id == owner_id).values(is_admin=User.is_admin))  # the write lock
            active = (
                s.scalar(
                    select(func.count())
                    .select_from(Study)
                    .where(Study.owner_id == owner_id, Study.state == STUDY_ACTIVE)
                )
                or 0
            )
            if active >= max_active:
                raise ActiveJobLimit(
                    f"you have {active} active studies; the limit is {max_active} "
                    "(GPUYARD_MAX_ACTIVE_STUDIES_PER_USER). Wait for one to finish or cancel one."
                )
            if s.get(Dataset, dataset_id) is None:
                raise UnknownDataset(f"data set {dataset_id} does not exist")
            study = Study(
                id=new_id("study"),
                owner_id=owner_id,
                name=name,
                dataset_id=dataset_id,
                state=STUDY_ACTIVE,
                request=request,
                created_at=now,
            )
            s.add(study)
            s.flush()
            s.refresh(study)
            return study

    def get_study(self, study_id: str, owner_id: int | None = None) -> Study | None:
        """The study, or None if missing or (when ``owner_id`` is given) someone else's."""
        with self._begin() as s:
            query = select(Study).where(Study.id == study_id)
            if owner_id is not None:
                query = query.where(Study.owner_id == owner_id)
            return s.scalar(query)

    def list_studies(self, owner_id: int | None = None, *, limit: int = 100) -> list[Study]:
        """Studies newest first (an owner's, or everyone's)."""
        query = select(Study).order_by(Study.created_at.desc(), Study.id.desc()).limit(limit)
        if owner_id is not None:
            query = query.where(Study.owner_id == owner_id)
        with self._begin() as s:
            return list(s.scalars(query).unique())

    def unsettled_study_ids(self) -> list[str]:
        """Every study a driver pass looks at, oldest first: the active ones, and the cancelled ones whose
        trials Optuna has not yet been told the end of (``finished_at`` is set once it has)."""
        with self._begin() as s:
            return list(
                s.scalars(select(Study.id).where(Study.finished_at.is_(None)).order_by(Study.created_at, Study.id))
            )

    def study_jobs(self, study_id: str) -> list[Job]:
        """A study's trial jobs by trial number."""
        with self._begin() as s:
            return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.trial_number)).unique())

    def take_study_driver(self, study_id: str, driver: str, seconds: float, *, now: dt.datetime | None = None) -> bool:
        """Hold the study for one driver pass (a lease of ``seconds``); False when another process holds it.

        A driver killed mid-pass holds the study only until its lease runs out; the next pass reconciles
        (worker/studies.py).
        """
        now = now or utcnow()
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Study)
                    .where(
                        Study.id == study_id,
                        Study.finished_at.is_(None),
                        or_(Study.driver.is_(None), Study.driver == driver, Study.driver_until < now),
                    )
                    .values(driver=driver, driver_until=now + dt.timedelta(seconds=seconds))
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def release_study_driver(self, study_id: str, driver: str) -> None:
        """Let the next pass advance the study at once."""
        with self._begin() as s:
            s.execute(
                update(Study)
                .where(Study.id == study_id, Study.driver == driver)
                .values(driver=None, driver_until=None)
                .execution_options(synchronize_session=False)
            )

    def cancel_study(self, study_id: str) -> bool:
        """An active study becomes ``cancelled``: no trial is asked any more (the caller cancels its jobs; the
        driver settles it once Optuna knows how they ended). Returns False if it was not active."""
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == STUDY_ACTIVE)
                    .values(state=STUDY_CANCELLED)
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def settle_study(self, study_id: str, *, now: dt.datetime | None = None) -> bool:
        """Every trial asked has ended and Optuna knows it: an active study becomes ``finished``, a cancelled
        one stays so; both get ``finished_at``. Returns False if it was settled already."""
        now = now or utcnow()
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.finished_at.is_(None))
                    .values(
                        state=case((Study.state == STUDY_ACTIVE, STUDY_FINISHED), else_=Study.state),
                        finished_at=now,
                        driver=None,
                        driver_until=None,
                    )
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )

    def active_trial_ids(self, study_id: str) -> list[str]:
        """The study's queued or running trial jobs."""
        with self._begin() as s:
            return list(
                s.scalars(select(Job.id).where(Job.study_id == study_id, Job.state.in_(ACTIVE_STATES)).order_by(Job.id))
            )

    def request_prune(self, job_id: str, reason: str, detail: str) -> bool:
        """Ask a running trial to stop (as a cancel does: checkpoint, exit) and end ``pruned`` with ``reason``.

        Returns:
            False when the job is not running or a prune was already asked (the first reason stands).
        """
        with self._begin() as s:
            return (
                rowcount(s.execute(
                    update(Job)
                    .where(and_(Job.id == job_id, Job.state == RUNNING, Job.prune_reason.is_(None)))
                    .values(cancel_requested=True, prune_reason=reason, prune_detail=detail)
                    .execution_options(synchronize_session=False)
                ))
                == 1
            )
