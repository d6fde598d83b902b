"""The celery engine on real servers: PostgreSQL, RabbitMQ and SeaweedFS started by the
test (Debian's packages, temporary directories, 127.0.0.1), two `imaging-service serve`
front-ends and two `imaging-service worker` processes with their own work directories,
driven through boto3.  Faults: a worker SIGKILLed mid-task, a front-end killed, the
broker stopped and restarted; cancellation within 5 s."""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import testtools
from botocore.exceptions import EndpointConnectionError

from imaging_service import celery_engine, tasks
from imaging_service.db import Database
from imaging_service.objectstore import ObjectStore
from tests import base
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, qemu_convert
from tests.service import fixtures as sf
from tests.service.celery_fixtures import Cluster, RabbitMQ

WHY_NOT = RabbitMQ.missing() or sf.PostgreSQL.missing()
# --orphan-after 10s: a heartbeat (1 s) can stall for seconds on a starved shared machine (load 10-18
# seen), and 4 s then requeued healthy tasks (attempts 2).
FAST = ["--instance-validation", "false", "--heartbeat", "1s", "--upload-poll", "1s", "--orphan-after", "10s",
        "--redispatch-after", "3s", "--log-level", "info"]
SLOW_HOOK = "#!/bin/bash\n# a validator that takes its time, for the kill and cancel tests\nsleep 15\n"


@testtools.skipIf(WHY_NOT, WHY_NOT)
class CeleryTest(base.TestCase):
    needs_root = True

    def cluster(self, slow=False):
        args = list(FAST)
        if slow:
            hook = self.path("elements", "test-slow", "validate.d", "10-slow")
            os.makedirs(os.path.dirname(hook))
            with open(hook, "w") as f:
                f.write(SLOW_HOOK)
            os.chmod(hook, 0o755)
            args += ["--elements-path", self.path("elements"),
                     "--elements-linux", "mounters validate-linux test-slow convert-qemu"]
        self.c = self.useFixture(Cluster(args))
        self.db = Database(self.c.pg.url)
        self.addCleanup(self.db.dispose)
        access, secret, self.account = self.c.user
        self.store = ObjectStore(self.c.seaweed.endpoint_url, "us-east-1", access, secret)
        self.bucket = f"{self.account}-images"
        self.store.ensure_bucket(self.bucket)
        return self.c

    def ec2(self, frontend):
        return frontend.client(*self.c.user[:2])

    def upload_vmdk(self, key="disk.vmdk", size_mib=24):
        """A small Linux disk as VMDK in the user's bucket (one per size: another size is
        another source, not a cache hit)."""
        vmdk = self.path(f"disk-{size_mib}.vmdk")
        if not os.path.exists(vmdk):
            raw = linux_disk(self.path(f"disk-{size_mib}.raw"), self.tmp, size=size_mib * MiB)
            qemu_convert(raw, vmdk, "vmdk")
        self.store.put_file(vmdk, self.bucket, key)
        return key

    def import_image(self, ec2, key, **kwargs):
        return ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": self.bucket, "S3Key": key}}], Platform="Linux", **kwargs)["ImportTaskId"]

    def wait(self, ec2, task_id, until=("completed", "deleted"), timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            task = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
            if task["Status"] in until:
                return task
            if time.monotonic() > deadline:
                logs = "\n".join(w.log()[-2000:] for w in self.c.workers)
                raise AssertionError(f"{task_id} still {task}\n{logs}")
            time.sleep(0.3)

    def row(self, task_id):
        with self.db.session() as s:
            return s.get(tasks.Task, task_id)

    def wait_step(self, task_id, step, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            task = self.row(task_id)
            if task.state == "converting" and task.step == step:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} never reached {step}: {task.state}/{task.step}")
            time.sleep(0.2)

    def resources_of(self, task_id):
        with self.db.session() as s:
            return s.query(tasks.Resource).filter_by(task_id=task_id).count()

    def assert_work_dirs_empty(self, workers):
        for w in workers:
            deadline = time.monotonic() + 10
            while os.listdir(w.work_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.assertEqual([], os.listdir(w.work_dir), w.work_dir)


class TestCeleryEngine(CeleryTest):

    def test_two_frontends_two_workers(self):
        c = self.cluster()
        workers = [c.worker(), c.worker()]
        front_a, front_b = c.frontend(), c.frontend()
        ec2_a, ec2_b = self.ec2(front_a), self.ec2(front_b)
        ids = []
        for i in range(4):
            key = self.upload_vmdk(f"disk-{i}.vmdk")
            ids.append(self.import_image((ec2_a, ec2_b)[i % 2], key, Description=f"d{i}"))
        for task_id in ids:  # any front-end answers for any task
            self.assertEqual("completed", self.wait(ec2_b, task_id)["Status"])
            self.assertEqual("completed", ec2_a.describe_import_image_tasks(
                ImportTaskIds=[task_id])["ImportImageTasks"][0]["Status"])
            self.assertEqual((1, 2), (self.row(task_id).attempts, self.resources_of(task_id)))
        # The first import converted; the others came from the cache or converted: every one
        # ran on one of the two worker machines, and both announced their limits.
        ran_on = {self.row(t).worker_id.split("/")[1].split("-")[0] for t in ids}
        self.assertLessEqual(ran_on, {str(w.process.pid) for w in workers})
        live = celery_engine.live_workers(self.db, 10)
        self.assertEqual(2, len(live), live)
        self.assertTrue(all(w["concurrency"] == 2 and w["scratch_capacity"] > 0 for w in live), live)

        # Kill a front-end: the other answers and dispatches.
        front_a.stop(signal.SIGKILL)
        self.assertRaises(EndpointConnectionError, ec2_a.describe_import_image_tasks)
        key = self.upload_vmdk("after-kill.vmdk")
        task_id = self.import_image(ec2_b, key, ClientToken="after-kill")
        self.assertEqual(task_id, self.import_image(ec2_b, key, ClientToken="after-kill"))
        self.assertEqual("completed", self.wait(ec2_b, task_id)["Status"])
        self.assertEqual(1, self.row(task_id).attempts)
        self.assert_work_dirs_empty(workers)

    def test_worker_killed_mid_task_and_cancel(self):
        c = self.cluster(slow=True)
        workers = [c.worker(), c.worker()]
        front = c.frontend()
        ec2 = self.ec2(front)
        task_id = self.import_image(ec2, self.upload_vmdk())
        holder = self.wait_step(task_id, "validate").worker_id
        victim = next(w for w in workers if f"/{w.process.pid}-" in holder)
        other = next(w for w in workers if w is not victim)
        victim.kill()  # a machine dies: its message is redelivered to the other worker
        done = self.wait(ec2, task_id, timeout=240)
        self.assertEqual("completed", done["Status"], done)
        task = self.row(task_id)
        self.assertEqual(2, task.attempts)
        self.assertIn(f"/{other.process.pid}-", task.worker_id)
        self.assertEqual(2, self.resources_of(task_id))  # registered once (an image and its snapshot)
        # The killed machine comes back: it releases and removes what the dead task left.
        self.assertNotEqual([], os.listdir(victim.work_dir))
        victim.start()

        # Cancellation reaches the running task through the database within 5 s.
        task_id = self.import_image(ec2, self.upload_vmdk("cancel.vmdk", size_mib=28))
        self.wait_step(task_id, "validate")
        started = time.monotonic()
        ec2.cancel_import_task(ImportTaskId=task_id)
        self.wait(ec2, task_id, until=("deleted",), timeout=30)
        while self.row(task_id).state != "cancelled":
            time.sleep(0.1)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(0, self.resources_of(task_id))
        self.assert_work_dirs_empty(workers)

    def test_worker_without_room_declines(self):
        """A worker whose scratch space cannot hold a task puts it back for one that can."""
        c = self.cluster()
        small = c.worker("--scratch-space", "64K")
        big = c.worker()
        front = c.frontend()
        ec2 = self.ec2(front)
        deadline = time.monotonic() + 60
        while len(celery_engine.live_workers(self.db, 10)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ids = [self.import_image(ec2, self.upload_vmdk(f"d{i}.vmdk")) for i in range(4)]
        for task_id in ids:
            self.assertEqual("completed", self.wait(ec2, task_id)["Status"])
            task = self.row(task_id)
            self.assertIn(f"/{big.process.pid}-", task.worker_id)
            self.assertEqual(1, task.attempts)
        self.assertIn("bytes of scratch", small.log())
        self.assert_work_dirs_empty([small, big])

    def healthz(self, front, until, timeout=40):
        """/healthz of a front-end once until(status, body) holds (its answer is cached 10 s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(front.url + "/healthz", timeout=10) as r:
                    found = r.status, json.load(r)
            except urllib.error.HTTPError as e:
                with e:
                    found = e.code, json.load(e)
            if until(*found):
                return found
            self.assertLess(time.monotonic(), deadline, found)
            time.sleep(1)

    def test_healthz(self):
        """/healthz of a celery front-end checks the broker and lists the live workers."""
        c = self.cluster()
        front = c.frontend()
        status, health = self.healthz(front, lambda status, h: True)
        self.assertEqual((200, "ok", []), (status, health["broker"], health["live_workers"]))
        first = c.worker()
        status, health = self.healthz(front, lambda status, h: h["live_workers"])
        self.assertEqual((200, "ok"), (status, health["workers"]))
        self.assertEqual([2], [w["concurrency"] for w in health["live_workers"]])
        self.assertIn(f"/{first.process.pid}-", health["live_workers"][0]["name"])
        c.rabbit.stop()
        status, health = self.healthz(front, lambda status, h: h["broker"] != "ok")
        self.assertEqual(503, status)
        self.assertIn("cannot connect", health["broker"])
        c.rabbit.start()

    def live(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while len(found := celery_engine.live_workers(self.db, 10)) < count:
            self.assertLess(time.monotonic(), deadline, found)
            time.sleep(0.2)
        return found

    def announcement(self, worker):
        return next((w for w in celery_engine.live_workers(self.db, 10) if f"/{worker.process.pid}-" in w["name"]),
                    None)

    def holder_of(self, task_id, workers):
        holder = self.wait_step(task_id, "validate").worker_id
        return next(w for w in workers if f"/{w.process.pid}-" in holder)

    def control(self, *args, check=True):
        return sf.cli("worker", *args, "--database-url", self.c.pg.url, "--state-dir",
                      os.path.join(self.c.dir, "admin"), "--heartbeat", "1s", check=check)

    def test_drain(self):
        """SIGTERM drains a worker: its running task ends there (one attempt), a task submitted
        meanwhile goes to another worker, then it exits 0.  `imaging-service worker drain` does
        the same without stopping the worker, and `worker resume` undoes it."""
        c = self.cluster(slow=True)
        workers = [c.worker(), c.worker()]
        ec2 = self.ec2(c.frontend())
        self.live(2)
        first = self.import_image(ec2, self.upload_vmdk())
        victim = self.holder_of(first, workers)
        other = next(w for w in workers if w is not victim)
        victim.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not (self.announcement(victim) or {}).get("draining"):
            self.assertLess(time.monotonic(), deadline, "the worker never announced it drains")
            time.sleep(0.2)
        self.assertIsNone(victim.process.poll())  # it finishes its task first
        second = self.import_image(ec2, self.upload_vmdk("second.vmdk", size_mib=28))
        self.assertIn(f"/{other.process.pid}-", self.wait_step(second, "validate").worker_id)
        self.assertEqual(0, victim.process.wait(90), victim.log()[-3000:])
        task = self.row(first)
        self.assertEqual(("completed", 1), (task.state, task.attempts))
        self.assertIn(f"/{victim.process.pid}-", task.worker_id)
        self.assertEqual(2, self.resources_of(first))
        self.assertIsNone(self.announcement(victim))  # it removed its announcement

        # Drain without stopping: `other` finishes `second`, takes nothing new, keeps running.
        name = self.announcement(other)["name"]
        self.assertEqual(f"{name}\tdraining\n", self.control("drain", name).stdout)
        third = self.import_image(ec2, self.upload_vmdk("third.vmdk", size_mib=32))
        self.assertEqual("completed", self.wait(ec2, second)["Status"])
        time.sleep(3)
        self.assertEqual(("pending", 0), (self.row(third).state, self.row(third).attempts))
        listed = json.loads(self.control("list", "--json").stdout)
        self.assertEqual([(name, True, 0)], [(w["name"], w["draining"], w["running"]) for w in listed])
        self.assertIsNone(other.process.poll())
        self.assertIn("no live worker nobody", self.control("drain", "nobody", check=False).stderr)
        self.assertEqual(f"{name}\ttaking tasks\n", self.control("resume").stdout)  # this host's
        self.assertEqual("completed", self.wait(ec2, third)["Status"])
        self.assertEqual(1, self.row(third).attempts)
        self.assert_work_dirs_empty(workers)

    def test_cold_shutdown_hands_back(self):
        """A second SIGTERM, or SIGQUIT (Celery's cold shutdown): the running task stops now, is
        handed back and runs on another worker, once (the interrupted attempt is not counted)."""
        c = self.cluster(slow=True)
        workers = [c.worker(), c.worker()]
        ec2 = self.ec2(c.frontend())
        self.live(2)
        for how, key in (((signal.SIGTERM, signal.SIGTERM), "disk.vmdk"), ((signal.SIGQUIT,), "quit.vmdk")):
            task_id = self.import_image(ec2, self.upload_vmdk(key, size_mib=24 + 4 * len(how)))
            victim = self.holder_of(task_id, workers)
            other = next(w for w in workers if w is not victim)
            for sig in how:
                victim.process.send_signal(sig)
                time.sleep(0.5)
            victim.process.wait(60)
            log = victim.log()
            self.assertIn("handing the 1 running tasks back", log)
            self.assertNotIn(f"task {task_id}: completed", log, log[-3000:])  # stopped, not finished
            self.assertEqual("completed", self.wait(ec2, task_id, timeout=120)["Status"])
            task = self.row(task_id)
            self.assertEqual(1, task.attempts)
            self.assertIn(f"/{other.process.pid}-", task.worker_id)
            self.assertEqual(2, self.resources_of(task_id))
            self.assertEqual([], os.listdir(victim.work_dir))
            victim.start()
            self.live(2)
        self.assert_work_dirs_empty(workers)

    def test_broker_stopped_and_restarted(self):
        c = self.cluster()
        workers = [c.worker(), c.worker()]
        front = c.frontend()
        ec2 = self.ec2(front)
        first = self.import_image(ec2, self.upload_vmdk())
        self.assertEqual("completed", self.wait(ec2, first)["Status"])
        c.rabbit.stop()
        # Submitted while the broker is down: the task is committed, its publish fails; once
        # the broker is back the workers reconnect and the re-publish sweep sends it.
        during = self.import_image(ec2, self.upload_vmdk("during.vmdk"), Description="during")
        self.assertEqual("active", ec2.describe_import_image_tasks(
            ImportTaskIds=[during])["ImportImageTasks"][0]["Status"])
        c.rabbit.start()
        after = self.import_image(ec2, self.upload_vmdk("after.vmdk"), Description="after")
        for task_id in (during, after):
            self.assertEqual("completed", self.wait(ec2, task_id, timeout=240)["Status"])
            self.assertEqual(1, self.row(task_id).attempts)
        self.assert_work_dirs_empty(workers)

    def test_api_behaves_as_on_the_embedded_engine(self):
        """A representative subset of tests/service/test_api.py on celery front-ends (no
        worker runs here, so tasks stay pending until cancelled)."""
        from botocore.exceptions import ClientError
        c = self.cluster()
        front_a, front_b = c.frontend(), c.frontend()
        ec2_a, ec2_b = self.ec2(front_a), self.ec2(front_b)
        key = self.upload_vmdk()
        task_id = self.import_image(ec2_a, key, Description="my image", ClientToken="t1")
        task = ec2_b.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual(("active", "pending", "my image"), (task["Status"], task["StatusMessage"],
                                                             task["Description"]))
        e = self.assertRaises(ClientError, self.import_image, ec2_b, key, Description="other", ClientToken="t1")
        self.assertEqual("IdempotentParameterMismatch", e.response["Error"]["Code"])
        e = self.assertRaises(ClientError, self.import_image, ec2_a, key, DryRun=True)
        self.assertEqual("DryRunOperation", e.response["Error"]["Code"])
        # Another account's task answers as one that does not exist.
        other = c._credential(["--database-url", c.pg.url, "--key-file", c.key_file],
                              os.path.join(c.dir, "admin"))
        stranger = front_b.client(*other[:2])
        self.assertEqual([], stranger.describe_import_image_tasks()["ImportImageTasks"])
        e = self.assertRaises(ClientError, stranger.cancel_import_task, ImportTaskId=task_id)
        self.assertIn("InvalidConversionTaskId", e.response["Error"]["Code"])
        cancelled = ec2_b.cancel_import_task(ImportTaskId=task_id, CancelReason="changed my mind")
        self.assertEqual(("active", "deleted"), (cancelled["PreviousState"], cancelled["State"]))
        task = ec2_a.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual(("deleted", "changed my mind"), (task["Status"], task["StatusMessage"]))
        # A worker that starts now gets the (published) message and leaves the cancelled task alone.
        worker = c.worker()
        deadline = time.monotonic() + 60
        while not celery_engine.live_workers(self.db, 10) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        self.assertEqual(("cancelled", 0), (self.row(task_id).state, self.row(task_id).attempts))
        self.assertIn("nothing to do: cancelled", worker.log())


class TestCeleryConfiguration(testtools.TestCase):

    def test_app_settings(self):
        from imaging_service import config
        settings = config.resolve({"engine": "celery", "broker_url": "amqp://127.0.0.1:9//",
                                   "state_dir": "/nonexistent"}, environ={})
        app = celery_engine.make_celery(settings)
        self.addCleanup(app.close)
        conf = app.conf
        self.assertEqual(("json", ["json"], 1, True, True),
                         (conf.task_serializer, conf.accept_content, conf.worker_prefetch_multiplier,
                          conf.task_acks_late, conf.task_reject_on_worker_lost))
        queue = conf.task_queues[0]
        self.assertEqual("imaging", queue.name)
        self.assertGreater(queue.queue_arguments["x-consumer-timeout"], conf.task_time_limit * 1000)
        self.assertGreater(conf.task_time_limit, settings.task_timeout.total_seconds())
        self.assertLess(conf.task_time_limit * 1000, RabbitMQ.CONSUMER_TIMEOUT_MS)
        self.assertRaises(config.ConfigError, config.resolve, {"engine": "celery-ish"}, environ={})
        settings.broker_url = None
        self.assertRaises(ValueError, celery_engine.make_celery, settings)
