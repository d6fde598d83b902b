"""The same task machine and API on PostgreSQL (Debian's server, started by the test in a
temporary directory): claims are SELECT ... FOR UPDATE SKIP LOCKED."""

import testtools

from imaging_service.db import Database
from tests.service import fixtures as sf
from tests.service.test_tasks import TaskMachineTests

WHY_NOT = sf.PostgreSQL.missing()


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestTasksPostgreSQL(TaskMachineTests, testtools.TestCase):

    def make_database(self):
        db = Database(self.useFixture(sf.PostgreSQL()).url)
        db.upgrade()
        db.upgrade()  # at every start: a second run changes nothing
        return db

    def test_claim_uses_skip_locked(self):
        statements = []
        from sqlalchemy import event
        event.listen(self.db.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: statements.append(statement))
        self.submit()
        from imaging_service import tasks
        self.assertIsNotNone(tasks.claim(self.db, "w"))
        self.assertTrue(any("FOR UPDATE SKIP LOCKED" in s for s in statements), statements)


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestServiceOnPostgreSQL(testtools.TestCase):

    def test_boto3_against_a_postgresql_service(self):
        pg = self.useFixture(sf.PostgreSQL())
        service = self.useFixture(sf.Service(engine="none", args=["--database-url", pg.url]))
        access, secret, _ = service.credential()
        ec2 = service.client(access, secret)
        task_id = ec2.import_image(DiskContainers=[{"Format": "RAW", "UserBucket": {
            "S3Bucket": "b", "S3Key": "k"}}])["ImportTaskId"]
        found = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
        self.assertEqual(["active"], [t["Status"] for t in found])


class DescribeIndexTests:
    """Migration 0003: the describe query's index (account_id, kind, created_at, id) is made,
    the one it replaces is gone, downgrade and upgrade again work, and the planner uses it
    for an account's page of tasks (no sort on SQLite)."""

    def make_url(self):
        raise NotImplementedError

    def test_index_migration(self):
        import alembic.command
        import alembic.config
        from sqlalchemy import inspect

        from imaging_service import db as dbmodule
        db = Database(self.make_url())
        self.addCleanup(db.dispose)
        db.upgrade()

        def indexes():
            return {i["name"]: i["column_names"] for i in inspect(db.engine).get_indexes("tasks")}
        self.assertEqual(["account_id", "kind", "created_at", "id"], indexes()["ix_tasks_account_kind_order"])
        self.assertNotIn("ix_tasks_account_kind", indexes())
        cfg = alembic.config.Config()
        cfg.set_main_option("script_location", dbmodule.MIGRATIONS)
        with db.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            alembic.command.downgrade(cfg, "0002")
        self.assertEqual(["account_id", "kind", "created_at"], indexes()["ix_tasks_account_kind"])
        self.assertNotIn("ix_tasks_account_kind_order", indexes())
        db.upgrade()
        self.assertIn("ix_tasks_account_kind_order", indexes())
        self.assertIn("ix_tasks_account_kind_order", self.plan(db))

    def plan(self, db):
        raise NotImplementedError


class TestDescribeIndexSQLite(DescribeIndexTests, testtools.TestCase):

    def make_url(self):
        return f"sqlite:///{self.useFixture(sf.TempDir()).path}/s.db"

    def plan(self, db):
        with db.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT id, state FROM tasks WHERE account_id = '1' AND kind IN "
                "('import-image') ORDER BY created_at, id LIMIT 5").all()
        text = "\n".join(str(r[-1]) for r in rows)
        self.assertNotIn("TEMP B-TREE", text)  # read in index order: no sort
        return text


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestDescribeIndexPostgreSQL(DescribeIndexTests, testtools.TestCase):

    def make_url(self):
        return self.useFixture(sf.PostgreSQL()).url

    def plan(self, db):
        with db.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")  # an empty table: ask whether it can
            rows = conn.exec_driver_sql(
                "EXPLAIN SELECT id, state FROM tasks WHERE account_id = '1' AND kind IN ('import-image') "
                "ORDER BY created_at, id LIMIT 5").all()
        text = "\n".join(r[0] for r in rows)
        self.assertNotIn("Sort", text)
        return text
