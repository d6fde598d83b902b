"""The task state machine on a real database (SQLite here; test_postgres runs the same
tests on PostgreSQL): atomic claims under concurrency, forward-only moves, orphans,
expiry, caching look-ups."""

import datetime
import threading

import testtools

from imaging_service import tasks
from imaging_service.credentials import Credentials
from imaging_service.db import Database
from imaging_service.errors import EC2Error
from imaging_service.models import utcnow
from tests.service import fixtures as sf

SOURCE = {"source": {"bucket": "b", "key": "k"}, "format": "raw"}


class TaskMachineTests:
    """Mixed into a TestCase whose make_database() returns a migrated Database."""

    def setUp(self):
        super().setUp()
        self.db = self.make_database()
        self.addCleanup(self.db.dispose)
        creds = Credentials(self.db, self.key_file())
        self.account = creds.create()[2]
        self.other = creds.create()[2]

    def key_file(self):
        return self.useFixture(sf.TempDir()).join("secret.key")

    def submit(self, account=None, **kwargs):
        return tasks.submit(self.db, account or self.account, "import-image", dict(SOURCE), **kwargs)

    def test_migrations_match_the_models(self):
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        from imaging_service.models import Base
        with self.db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        self.assertEqual([], diff)

    def test_concurrent_claims_take_each_task_once(self):
        submitted = {self.submit().id for _ in range(60)}
        claimed, errors = [], []

        def work(n):
            try:
                while (task := tasks.claim(self.db, f"worker-{n}")) is not None:
                    claimed.append((task.id, task.worker_id))
            except Exception as e:  # noqa: BLE001 -- reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        self.assertEqual(sorted(submitted), sorted(task_id for task_id, _ in claimed))
        self.assertEqual(60, len(claimed))

    def test_forward_only(self):
        task = self.submit()
        self.assertIsNone(tasks.complete(self.db, task.id, "w", {}, []))  # not claimed
        self.assertEqual(task.id, tasks.claim(self.db, "w").id)
        self.assertTrue(tasks.progress(self.db, task.id, "w", step="convert", progress=50))
        self.assertFalse(tasks.progress(self.db, task.id, "intruder", progress=60))
        previous, cancelling = tasks.cancel(self.db, self.account, task.id)
        self.assertEqual(("converting", "cancelling"), (previous, cancelling.state))
        self.assertTrue(tasks.cancel_requested(self.db, task.id))
        self.assertFalse(tasks.progress(self.db, task.id, "w", progress=70))
        self.assertIsNone(tasks.complete(self.db, task.id, "w", {}, []))
        self.assertTrue(tasks.finish_cancel(self.db, task.id, "w"))
        self.assertFalse(tasks.finish_cancel(self.db, task.id, "w"))
        self.assertFalse(tasks.fail(self.db, task.id, None, "too late"))
        final = tasks.get(self.db, self.account, task.id)
        self.assertEqual(("cancelled", 50), (final.state, final.progress))
        e = self.assertRaises(EC2Error, tasks.cancel, self.db, self.account, task.id)
        self.assertEqual("IncorrectState", e.code)

    def test_other_account_sees_nothing(self):
        task = self.submit()
        self.assertIsNone(tasks.get(self.db, self.other, task.id))
        self.assertIsNone(tasks.cancel(self.db, self.other, task.id))
        self.assertEqual([], tasks.query(self.db, self.other, ("import-image",))[0])
        self.assertEqual("pending", tasks.get(self.db, self.account, task.id).state)

    def test_client_token(self):
        first = self.submit(client_token="t")
        self.assertEqual(first.id, self.submit(client_token="t").id)
        self.assertNotEqual(first.id, self.submit(account=self.other, client_token="t").id)
        e = self.assertRaises(EC2Error, tasks.submit, self.db, self.account, "import-snapshot", dict(SOURCE),
                              client_token="t")
        self.assertEqual("IdempotentParameterMismatch", e.code)

    def test_complete_registers_resources(self):
        task = self.submit()
        tasks.claim(self.db, "w")
        done = tasks.complete(self.db, task.id, "w", {"note": "x"}, [
            {"kind": "image", "bucket": "svc", "key": "k.raw", "size": 10, "source_digest": "sha256:1",
             "options_digest": "o"}])
        self.assertEqual(("completed", 100), (done.state, done.progress))
        image_id = done.result["image_id"]
        self.assertRegex(image_id, r"^ami-[0-9a-f]{17}$")
        self.assertEqual(image_id, tasks.cached_resource(self.db, self.account, "sha256:1", "o").id)
        self.assertIsNone(tasks.cached_resource(self.db, self.other, "sha256:1", "o"))
        self.assertIsNone(tasks.cached_resource(self.db, self.account, "sha256:1", "other options"))
        self.assertEqual([image_id], [r.id for r in tasks.resources(self.db, self.account, "image")])
        self.assertEqual([], tasks.resources(self.db, self.other, "image", ids=[image_id]))

    def test_orphans_retried_then_failed(self):
        task = self.submit()
        later = utcnow() + datetime.timedelta(minutes=5)
        for attempt in (1, 2):
            self.assertEqual(task.id, tasks.claim(self.db, f"w{attempt}").id)
            self.assertEqual([], tasks.requeue_orphans(self.db, 60, max_attempts=2))  # fresh heartbeat
            done = tasks.requeue_orphans(self.db, 60, max_attempts=2, now=later)
            self.assertEqual([{"id": task.id, "worker_id": f"w{attempt}",
                               "state": "pending" if attempt == 1 else "failed"}], done)
        final = tasks.get(self.db, self.account, task.id)
        self.assertEqual("failed", final.state)
        self.assertIn("worker w2 stopped during download; failed after 2 attempts", final.status_message)

    def test_expiry_timeout_retention(self):
        waiting = tasks.submit(self.db, self.account, "import-volume", {"source": {"manifest_url": "u"}},
                               wait_for_upload=True, upload_expiry=datetime.timedelta(seconds=1))
        running = self.submit()
        tasks.claim(self.db, "w")
        now = utcnow() + datetime.timedelta(hours=4)
        counts = tasks.expire(self.db, now=now)
        self.assertEqual({"upload-expired": 1, "timed-out": 1, "deleted": 0}, counts)
        self.assertEqual("failed", tasks.get(self.db, self.account, waiting.id).state)
        timed_out = tasks.get(self.db, self.account, running.id)
        self.assertEqual(("cancelling", "timed out after 180 minutes"), (timed_out.state, timed_out.status_message))
        self.assertTrue(tasks.cancel_requested(self.db, running.id))
        tasks.finish_cancel(self.db, running.id, "w")
        counts = tasks.expire(self.db, now=now + datetime.timedelta(days=8))
        self.assertEqual(2, counts["deleted"])
        self.assertIsNone(tasks.get(self.db, self.account, running.id))

    def test_upload_then_claim(self):
        waiting = tasks.submit(self.db, self.account, "import-volume", {"source": {"manifest_url": "u"}},
                               wait_for_upload=True)
        self.assertIsNone(tasks.claim(self.db, "w"))
        self.assertEqual([waiting.id], [t.id for t in tasks.waiting_uploads(self.db)])
        self.assertTrue(tasks.mark_uploaded(self.db, waiting.id))
        self.assertFalse(tasks.mark_uploaded(self.db, waiting.id))
        self.assertEqual(waiting.id, tasks.claim(self.db, "w").id)

    def test_account_cap(self):
        for _ in range(3):
            self.submit(max_active=3)
        e = self.assertRaises(EC2Error, self.submit, max_active=3)
        self.assertEqual("ResourceLimitExceeded", e.code)
        self.submit(account=self.other, max_active=3)


class TestTasksSQLite(TaskMachineTests, testtools.TestCase):

    def make_database(self):
        path = self.useFixture(sf.TempDir()).join("service.db")
        db = Database(f"sqlite:///{path}")
        db.upgrade()
        return db
