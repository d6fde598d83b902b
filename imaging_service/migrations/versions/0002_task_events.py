"""The toolkit's events of each task (bounded; deleted with the task).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("tasks", sa.Column("events", sa.JSON))


def downgrade():
    op.drop_column("tasks", "events")
