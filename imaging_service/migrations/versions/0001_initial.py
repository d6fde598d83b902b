"""Accounts, credentials, tasks, resources.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from imaging_service.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(12), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("is_operator", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False))
    op.create_table(
        "credentials",
        sa.Column("access_key", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(12), sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("secret_encrypted", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime))
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(12), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("step", sa.String(32)),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("bytes_total", sa.BigInteger),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.Column("status_message", sa.Text),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("client_token", sa.String(128)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("heartbeat_at", UTCDateTime),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("worker_id", sa.String(128)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False))
    op.create_index("ix_tasks_account_kind", "tasks", ["account_id", "kind", "created_at"])
    op.create_index("ix_tasks_state", "tasks", ["state", "created_at"])
    op.create_index("ix_tasks_client_token", "tasks", ["account_id", "client_token"], unique=True)
    op.create_table(
        "resources",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(12), sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("task_id", sa.String(64)),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("platform", sa.String(16)),
        sa.Column("architecture", sa.String(16)),
        sa.Column("description", sa.Text),
        sa.Column("inspection", sa.JSON),
        sa.Column("source_digest", sa.String(128)),
        sa.Column("options_digest", sa.String(128)),
        sa.Column("created_at", UTCDateTime, nullable=False))
    op.create_index("ix_resources_cache", "resources", ["account_id", "source_digest", "options_digest"])


def downgrade():
    for table in ("resources", "tasks", "credentials", "accounts"):
        op.drop_table(table)
