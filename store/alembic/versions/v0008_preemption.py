"""preemption, quotas, usage: users.may_pin, quota; jobs.preemptions, preempted_by, preempted_at; job_attempts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

waiting_reason grows to 120 characters ("preempting <job>, <job>").
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"  # rechained after the studies' 0007 at merge (both began on 0006)
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("may_pin", sa.Boolean(), server_default=sa.text("FALSE"), nullable=False))
    op.add_column("users", sa.Column("quota_gpu_hours", sa.Float(), nullable=True))
    op.add_column("users", sa.Column("quota_period", sa.String(length=8), nullable=True))
    op.add_column("jobs", sa.Column("preemptions", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("jobs", sa.Column("preempted_by", sa.String(length=32), nullable=True))
    op.add_column("jobs", sa.Column("preempted_at", sa.DateTime(), nullable=True))
    _waiting_reason_length(32, 120)
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("gpu", sa.String(length=64), nullable=True),
        sa.Column("memory_fraction", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_attempts_job_id", "job_attempts", ["job_id"])
    op.create_index("ix_job_attempts_started", "job_attempts", ["started_at"])
    op.create_index("ix_job_attempts_owner", "job_attempts", ["owner_id"])


def downgrade() -> None:
    op.drop_table("job_attempts")
    _waiting_reason_length(120, 32)
    for column in ("preempted_at", "preempted_by", "preemptions"):
        op.drop_column("jobs", column)
    for column in ("quota_period", "quota_gpu_hours", "may_pin"):
        op.drop_column("users", column)


def _waiting_reason_length(old: int, new: int) -> None:
    """PostgreSQL only. SQLite does not enforce VARCHAR lengths, and altering a column there copies the table:
    dropping the old ``jobs`` (foreign keys on, in the migration's transaction) would cascade-delete every
    job's events, operations and attempts. store.migrations.compare_type knows the lengths may differ there."""
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("jobs", "waiting_reason", type_=sa.String(length=new), existing_type=sa.String(length=old))
