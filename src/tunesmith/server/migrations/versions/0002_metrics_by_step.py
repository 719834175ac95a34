"""An index on metrics (job_id, step): a job's points are read in step order (the dashboard's loss chart, the
results CSV) without a sort of every row of the job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_metrics_job_id_step", "metrics", ["job_id", "step"])


def downgrade() -> None:
    op.drop_index("ix_metrics_job_id_step", table_name="metrics")
