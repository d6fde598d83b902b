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


class DescribeQueryTests:
    """tasks.query, the describe calls' prepared statement, on each database: pages in
    (created_at, id) order with NextToken, by ids, by states, only the account's own."""

    def test_describe_query(self):
        from imaging_service import tasks
        from imaging_service.credentials import Credentials
        db = Database(self.make_url())
        self.addCleanup(db.dispose)
        db.upgrade()
        creds = Credentials(db, f"{self.useFixture(sf.TempDir()).path}/k")
        _, _, mine = creds.create()
        _, _, other = creds.create()
        made = [tasks.submit(db, mine, "import-image", {"source": {"bucket": "b", "key": str(i)}, "format": "raw"})
                for i in range(5)]
        theirs = tasks.submit(db, other, "import-image", {"source": {"bucket": "b", "key": "x"}, "format": "raw"})
        seen, token = [], None
        while True:
            page, token = tasks.query(db, mine, ("import-image",), limit=2, next_token=token)
            self.assertLessEqual(len(page), 2)
            seen += page
            if token is None:
                break
        self.assertEqual([t.id for t in made], [t.id for t in seen])
        self.assertEqual("pending", seen[0].state)
        self.assertEqual({"bucket": "b", "key": "0"}, seen[0].params["source"])  # JSON decoded
        self.assertIsNotNone(seen[0].created_at.tzinfo)  # UTC datetimes
        found, _ = tasks.query(db, mine, ("import-image",), ids=[made[3].id, made[1].id, theirs.id])
        self.assertEqual([made[1].id, made[3].id], [t.id for t in found])
        self.assertEqual([], tasks.query(db, mine, ("import-image",), states=["completed", "failed"])[0])
        self.assertEqual(5, len(tasks.query(db, mine, ("import-image",), states=["pending"])[0]))
        self.assertEqual([], tasks.query(db, mine, ("import-volume", "import-instance"))[0])


class TestDescribeQuerySQLite(DescribeQueryTests, testtools.TestCase):
    make_url = TestDescribeIndexSQLite.make_url


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestDescribeQueryPostgreSQL(DescribeQueryTests, testtools.TestCase):
    make_url = TestDescribeIndexPostgreSQL.make_url
