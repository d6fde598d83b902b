"""The describe index covers its whole ORDER BY (created_at, id): a page of an account's
tasks (MaxResults/NextToken) is read in index order and stops at the limit, with no sort.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_index("ix_tasks_account_kind_order", "tasks", ["account_id", "kind", "created_at", "id"])
    op.drop_index("ix_tasks_account_kind", table_name="tasks")


def downgrade():
    op.create_index("ix_tasks_account_kind", "tasks", ["account_id", "kind", "created_at"])
    op.drop_index("ix_tasks_account_kind_order", table_name="tasks")
