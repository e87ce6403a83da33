"""studies: tuning_studies; jobs.study_id, trial_number, prune_reason, prune_detail; the job state 'pruned'

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A study (worker/studies.py) runs its trials as jobs: each trial job names its study and Optuna trial number
(one job per trial: a unique index), and a trial its pruner stops ends ``pruned`` with the reason it was
given. Optuna's own tables (studies, trials, ...) are created by Optuna in the same database, not here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_STATES_0006 = "'queued','running','succeeded','failed','cancelled','interrupted'"
_STATES_0007 = _STATES_0006 + ",'pruned'"
_STUDY_STATES = "'active','finished','cancelled'"
_STATE_CHECKS = (("jobs", "ck_jobs_state"), ("operations", "ck_operations_state"))


def upgrade() -> None:
    op.create_table(
        "tuning_studies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("dataset_id", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("driver", sa.String(length=255), nullable=True),
        sa.Column("driver_until", sa.DateTime(), nullable=True),
        sa.CheckConstraint(f"state IN ({_STUDY_STATES})", name="ck_studies_state"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tuning_studies_dataset_id", "tuning_studies", ["dataset_id"])
    op.create_index("ix_tuning_studies_owner_id", "tuning_studies", ["owner_id"])
    # SQLite cannot add a foreign key or change a CHECK in place: batch mode copies the table (the runner
    # turns SQLite's foreign keys off meanwhile, so the copy cascades to no job_events or operations row).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("study_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("trial_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prune_reason", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("prune_detail", sa.Text(), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_study_id_tuning_studies", "tuning_studies", ["study_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_jobs_study_id", ["study_id"])
        batch.create_index("uq_jobs_study_trial", ["study_id", "trial_number"], unique=True)
    _state_checks(_STATES_0007)


def downgrade() -> None:
    op.execute("UPDATE jobs SET state = 'cancelled' WHERE state = 'pruned'")
    op.execute("UPDATE operations SET state = 'cancelled' WHERE state = 'pruned'")
    _state_checks(_STATES_0006)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("uq_jobs_study_trial")
        batch.drop_index("ix_jobs_study_id")
        batch.drop_constraint("fk_jobs_study_id_tuning_studies", type_="foreignkey")
        for column in ("prune_detail", "prune_reason", "trial_number", "study_id"):
            batch.drop_column(column)
    op.drop_index("ix_tuning_studies_owner_id", table_name="tuning_studies")
    op.drop_index("ix_tuning_studies_dataset_id", table_name="tuning_studies")
    op.drop_table("tuning_studies")


def _state_checks(states: str) -> None:
    for table, name in _STATE_CHECKS:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(name, type_="check")
            batch.create_check_constraint(name, f"state IN ({states})")
