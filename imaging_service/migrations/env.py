"""Alembic environment: the caller (Database.upgrade) hands over its connection."""

from alembic import context

from imaging_service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
