"""The service's tables (SQLAlchemy 2).  The schema itself is made by the
Alembic migrations in imaging_service/migrations/; these classes must match.
"""

import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive ones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None:
            value = value.replace(tzinfo=datetime.UTC)
        return value


def utcnow():
    return datetime.datetime.now(datetime.UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(12), primary_key=True)  # 12 digits, as AWS
    name: Mapped[str | None] = mapped_column(String(200))
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Credential(Base):
    __tablename__ = "credentials"
    access_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    # Fernet token of the secret key (credentials.py): SigV4 needs the secret server-side.
    secret_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    state: Mapped[str] = mapped_column(String(32))
    step: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    status_message: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    client_token: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The toolkit's events of the last attempt (tasks.save_events; bounded), loaded only when asked.
    events: Mapped[list | None] = mapped_column(JSON, deferred=True)

    __table_args__ = (
        # The describe calls: an account's tasks of some kinds in (created_at, id) order (0003).
        Index("ix_tasks_account_kind_order", "account_id", "kind", "created_at", "id"),
        Index("ix_tasks_state", "state", "created_at"),
        Index("ix_tasks_client_token", "account_id", "client_token", unique=True),
    )


class Resource(Base):
    __tablename__ = "resources"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ami-, snap-, vol-
    kind: Mapped[str] = mapped_column(String(16))  # image | snapshot | volume
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16), default="raw")
    platform: Mapped[str | None] = mapped_column(String(16))
    architecture: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)
    inspection: Mapped[dict | None] = mapped_column(JSON)
    source_digest: Mapped[str | None] = mapped_column(String(128))
    options_digest: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_resources_cache", "account_id", "source_digest", "options_digest"),)
