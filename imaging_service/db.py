"""The service's database: SQLAlchemy 2 engine and sessions, Alembic migrations.

SQLite (WAL, for one machine) by default, PostgreSQL by URL.  Writes that
read first (claims, state changes) open their SQLite transaction with
BEGIN IMMEDIATE so that two writers wait for each other instead of failing
with "database is locked" half-way.
"""

import collections
import contextlib
import os

import alembic.command
import alembic.config
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


class Database:
    def __init__(self, url, echo=False):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite and (url.rstrip("/") == "sqlite:" or ":memory:" in url):
            raise ValueError(f"database {url}: an in-memory SQLite database is not shared between the "
                             "service's threads; give a file (sqlite:////path/service.db)")
        # Enough pooled connections for the API threads, the workers and the maintenance: a
        # connection closed and opened again under load costs far more than an idle one.
        kwargs = {"pool_size": 20, "max_overflow": 20}
        if self.is_sqlite:
            # Python's sqlite3 opens transactions on its own; take that over (SQLAlchemy's recipe).
            kwargs["connect_args"] = {"timeout": 30, "isolation_level": None}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, echo=echo, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
            # WAL is a property of the file: set once here, not on every new connection (the
            # pragma takes a lock, and would wait behind a writer).
            raw = self.engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA journal_mode=WAL")
            finally:
                raw.close()
        self._write_engine = self.engine.execution_options(sqlite_immediate=True)
        self._prepared = {}  # statement: its prepared() runner

    @contextlib.contextmanager
    def session(self, write=False):
        """A Session committed at the end of the block, rolled back on an exception.

        write=True: the block changes rows it read (takes SQLite's write lock at once).
        """
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def prepared(self, stmt):
        """A read compiled once for this database's driver: run(**values) -> [row], rows
        being named tuples with the statement's column names and SQLAlchemy's own type
        processing (JSON, UTC datetimes).  For the per-request reads (an access key's
        liveness, the describe query): SQLAlchemy's work for each execution costs several
        times the driver's.  The statement may not use expanding IN parameters."""
        found = self._prepared.get(stmt)
        if found is None:
            if len(self._prepared) > 512:  # statements built per shape: a bound, not a leak
                self._prepared.clear()
            found = self._prepared[stmt] = self._prepare(stmt)
        return found

    def _prepare(self, stmt):
        dialect = self.engine.dialect
        compiled = stmt.compile(dialect=dialect)
        sql, positional = compiled.string, compiled.positional
        names = list(compiled.positiontup) if positional else list(compiled.binds)
        # Parameters the dialect adds itself have their values (SQLite's LIMIT ? OFFSET ?).
        defaults = {name: compiled.binds[name].value for name in names if compiled.binds[name].value is not None}
        binds = {name: compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names}
        binds = {name: f for name, f in binds.items() if f is not None}
        columns = list(stmt.selected_columns)
        row_type = collections.namedtuple("Row", [c.key for c in columns])
        results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        if not any(results):
            results = None

        def run(**values):
            values = {**defaults, **values}
            for name, process in binds.items():
                values[name] = process(values[name])
            params = tuple(values[n] for n in names) if positional else values
            conn = self.engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute(sql, params)
                    rows = cursor.fetchall()
                finally:
                    cursor.close()
            finally:
                conn.close()  # back to the pool, which ends PostgreSQL's implicit transaction
            if results is None:
                return [row_type(*row) for row in rows]
            return [row_type(*[v if f is None or v is None else f(v) for f, v in zip(results, row)]) for row in rows]
        return run

    def upgrade(self):
        """Bring the schema to the newest migration (run at every start)."""
        cfg = alembic.config.Config()
        cfg.set_main_option("script_location", MIGRATIONS)
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            alembic.command.upgrade(cfg, "head")

    def dispose(self):
        self.engine.dispose()


def _sqlite_connect(dbapi_connection, record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection):
    immediate = connection.get_execution_options().get("sqlite_immediate")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
