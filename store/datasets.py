"""Data sets: content-addressed uploads, one row per owner and content."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, exists, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.states import (
    ACTIVE_STATES,
)
from store.base import StoreBase, rowcount
from store.errors import DatasetInUse
from store.tables import (
    Dataset,
    Job,
    new_id,
    utcnow,
)


class DatasetsStore(StoreBase):
    """Data sets and the files they own."""

    # ── data sets ──
    def add_dataset(
        self,
        owner_id: int,
        sha256: str,
        size_bytes: int,
        summary: dict[str, Any],
        storage_key: str,
        *,
        name: str | None = None,
        place_file: Callable[[], object] | None = None,
    ) -> tuple[Dataset, bool]:
        """Record a stored data set; the same content for the same owner returns the existing row.

        Args:
            place_file: puts the content-addressed file in place (or keeps the one there); called after the
                row is written, under the content's lock, so a concurrent delete of another row with the
                same content either finishes first (and the file is placed again) or sees this row.

        Returns:
            ``(dataset, created)``: ``created`` is False when the owner already had this content.
        """
        existing = self.find_dataset(owner_id, sha256)
        if existing is not None:
            return existing, False
        try:
            with self._begin() as s:
                self._lock_content(s, sha256)
                dataset = Dataset(
                    id=new_id("ds"),
                    owner_id=owner_id,
                    name=name,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    summary=summary,
                    storage_key=storage_key,
                    created_at=utcnow(),
                )
                s.add(dataset)
                s.flush()  # SQLite: the INSERT takes the database's write lock, held until commit
                if place_file is not None:
                    place_file()
                s.refresh(dataset)
                return dataset, True
        except IntegrityError:
            # The same upload raced us and won: theirs is ours.
            existing = self.find_dataset(owner_id, sha256)
            if existing is None:
                raise
            return existing, False

    def find_dataset(self, owner_id: int, sha256: str) -> Dataset | None:
        """The owner's data set with this content, if any."""
        with self._begin() as s:
            return s.scalar(select(Dataset).where(Dataset.owner_id == owner_id, Dataset.sha256 == sha256))

    def get_dataset(self, dataset_id: str, owner_id: int | None = None) -> Dataset | None:
        """The data set, or None if missing or (when ``owner_id`` is given) someone else's."""
        with self._begin() as s:
            query = select(Dataset).where(Dataset.id == dataset_id)
            if owner_id is not None:
                query = query.where(Dataset.owner_id == owner_id)
            return s.scalar(query)

    def list_datasets(self, owner_id: int | None = None) -> list[Dataset]:
        """Data sets, newest first; every owner's when ``owner_id`` is None."""
        with self._begin() as s:
            query = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id)
            if owner_id is not None:
                query = query.where(Dataset.owner_id == owner_id)
            return list(s.scalars(query))

    def delete_dataset(
        self, dataset_id: str, owner_id: int | None = None, *, remove_file: Callable[[str], object] | None = None
    ) -> Dataset | None:
        """Delete a data set row unless a queued or running job uses it.

        Args:
            remove_file: removes the stored file by key; called, under the content's lock and before the
                commit, only when no other row (any owner) still points at it.

        Returns:
            The deleted row, or None if there was none (or it is someone else's).

        Raises:
            DatasetInUse: a queued or running job uses it.
        """
        dataset = self.get_dataset(dataset_id, owner_id)
        if dataset is None:
            return None
        active = exists().where(Job.dataset_id == dataset_id, Job.state.in_(ACTIVE_STATES))
        with self._begin() as s:
            self._lock_content(s, dataset.sha256)
            # One statement decides, so a job submitted meanwhile either blocks this or fails its FK.
            deleted = rowcount(s.execute(
                delete(Dataset).where(Dataset.id == dataset_id, ~active).execution_options(synchronize_session=False)
            ))
            shared = s.scalar(select(exists().where(Dataset.storage_key == dataset.storage_key)))
            if deleted == 1 and not shared and remove_file is not None:
                remove_file(dataset.storage_key)
        if deleted == 1:
            return dataset
        if self.get_dataset(dataset_id, owner_id) is None:
            return None
        raise DatasetInUse(f"data set {dataset_id} is used by a queued or running job; cancel it first")

    def _lock_content(self, s: Session, sha256: str) -> None:
        """Serialize the row and file changes of one content address across processes until commit.

        PostgreSQL: a transaction-scoped advisory lock on the hash. SQLite: the transaction's first write
        takes the database's write lock, so both callers write before they look or touch the file.
        """
        if self.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int(sha256[:15], 16)})
