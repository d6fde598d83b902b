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
