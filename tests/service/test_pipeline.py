"""The back-end end to end: `imaging-service serve` with its embedded SeaweedFS
and workers, driven by boto3 (ec2 and s3 clients, unchanged), on small real
images built by the test.  Instance validation is off here (a TCG boot takes
30 s or more) except in the one test that says so.
"""

import os
import signal
import subprocess
import threading
import time

import testtools
from botocore.exceptions import ClientError

from imaging_service import manifest, tasks
from imaging_service.clients import imaging as imaging_client
from imaging_service.credentials import Credentials
from imaging_service.db import Database
from imaging_service.objectstore import ObjectStore, ObjectStoreError
from imaging_service.seaweed import free_port_pair
from tests import base
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, qemu_convert
from tests.service import fixtures as sf

FAST = ["--instance-validation", "false", "--heartbeat", "1s", "--upload-poll", "1s", "--orphan-after", "4s"]
SLOW_HOOK = "#!/bin/bash\n# a validator that takes its time, for cancel and kill tests\nsleep 40\n"


def sha256(path):
    return base.file_digest(path, "sha256")


def processes_of(path):
    """Pids whose command line names `path` or whose working directory is in it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline or cwd == path or cwd.startswith(path + "/"):
            found.append(int(pid))
    return found


def qemu_convert_to_raw(src, dst):
    subprocess.run(["qemu-img", "convert", "-O", "raw", src, dst], check=True)
    return dst


class PipelineTest(base.TestCase):
    needs_root = True

    def start(self, *args, state_dir=None):
        self.s3_port = getattr(self, "s3_port", None) or free_port_pair()
        service = sf.Service(engine="embedded", args=[*FAST, "--s3-port", str(self.s3_port), *args],
                             state_dir=state_dir or self.path("state"), start_timeout=120)
        self.service = self.useFixture(service)
        return service

    def user(self):
        access, secret, account = self.service.credential()
        ec2 = self.service.client(access, secret)
        store = ObjectStore(f"http://127.0.0.1:{self.s3_port}", "us-east-1", access, secret)
        bucket = f"{account}-images"
        deadline = time.monotonic() + 20  # the service gives the store new keys within seconds
        while True:
            try:
                store.ensure_bucket(bucket)
                break
            except ObjectStoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return ec2, store, bucket, account

    def db(self):
        db = Database("sqlite:///" + os.path.join(self.service.state_dir, "service.db"))
        self.addCleanup(db.dispose)
        return db

    def operator_store(self):
        db = self.db()
        for access, secret, _account, operator in Credentials(db, os.path.join(self.service.state_dir,
                                                                               "secret.key")).identities():
            if operator:
                return ObjectStore(f"http://127.0.0.1:{self.s3_port}", "us-east-1", access, secret)
        raise AssertionError("no operator key")

    def stored_object(self, resource, path):
        """The object of a registered resource, read with the service's own keys into `path`."""
        _size, chunks = self.operator_store().get_stream(resource.bucket, resource.key)
        with open(path, "wb") as f:
            f.writelines(chunks)
        return path

    def vmdk(self, name="disk"):
        raw = linux_disk(self.path(f"{name}.raw"), self.tmp)
        vmdk = qemu_convert(raw, self.path(f"{name}.vmdk"), "vmdk")
        return raw, vmdk

    def import_image(self, ec2, bucket, key, fmt="VMDK", **kwargs):
        return ec2.import_image(DiskContainers=[{"Format": fmt, "UserBucket": {"S3Bucket": bucket, "S3Key": key}}],
                                Platform="Linux", **kwargs)["ImportTaskId"]

    def wait_image(self, ec2, task_id, until=("completed", "deleted"), timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            task = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
            if task["Status"] in until:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} still {task}\n{self.service.log()[-3000:]}")
            time.sleep(0.5)

    def wait_conversion(self, ec2, task_id, until=("completed", "cancelled"), timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            task = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
            if task["State"] in until:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} still {task}\n{self.service.log()[-3000:]}")
            time.sleep(0.5)

    def wait_export(self, ec2, export_id, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            export = ec2.describe_export_image_tasks(ExportImageTaskIds=[export_id])["ExportImageTasks"][0]
            if export["Status"] in ("completed", "deleted") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual("completed", export["Status"], export)
        return export

    def wait_step(self, task_id, step, timeout=60):
        db = self.db()
        deadline = time.monotonic() + timeout
        while True:
            with db.session() as s:
                task = s.get(tasks.Task, task_id)
                if task.state == "converting" and task.step == step:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} never reached step {step}: {task.state}/{task.step}")
            time.sleep(0.2)

    def slow_elements(self):
        """An operator's element directory with a validator that sleeps (elements are configuration)."""
        hook = self.path("elements", "test-slow", "validate.d", "10-slow")
        os.makedirs(os.path.dirname(hook))
        with open(hook, "w") as f:
            f.write(SLOW_HOOK)
        os.chmod(hook, 0o755)
        return ["--elements-path", self.path("elements"),
                "--elements-linux", "mounters validate-linux test-slow convert-qemu"]

    def assert_no_work_left(self):
        work = os.path.join(self.service.state_dir, "work")
        deadline = time.monotonic() + 10
        while os.listdir(work) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual([], os.listdir(work))


class TestImports(PipelineTest):

    def test_import_image_vmdk_end_to_end(self):
        self.start()
        ec2, store, bucket, account = self.user()
        raw, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "uploads/disk.vmdk")
        task_id = self.import_image(ec2, bucket, "uploads/disk.vmdk", Description="first")
        task = self.wait_image(ec2, task_id)
        self.assertEqual("completed", task["Status"], task)
        image_id = task["ImageId"]
        self.assertRegex(image_id, r"^ami-[0-9a-f]{17}$")
        self.assertEqual("Linux", task["Platform"])
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
        self.assertEqual(account, image["OwnerId"])
        # The converted disk is in the service's bucket (qcow2, the default store_format), holding
        # byte for byte the disk the VMDK holds; the size recorded is the disk's, not the file's.
        with self.db().session() as s:
            resource = s.get(tasks.Resource, image_id)
            self.assertEqual(("qcow2", os.path.getsize(raw)), (resource.format, resource.size))
            self.assertTrue(resource.key.endswith(".qcow2"), resource.key)
            self.assertEqual(sha256(vmdk), resource.source_digest)
            self.assertEqual("debian", (resource.inspection or {}).get("distro"))
        stored = self.stored_object(resource, self.path("stored.qcow2"))
        self.assertLess(os.path.getsize(stored), os.path.getsize(raw))  # the free space is not stored
        self.assertEqual(sha256(raw), sha256(qemu_convert_to_raw(stored, self.path("stored.raw"))))
        # The user cannot read the service's bucket with their own keys.
        self.assertRaises(ObjectStoreError, store.get_stream, resource.bucket, resource.key)

        # Caching: the same source and options again reuse the result, and say so.
        store.put_file(vmdk, bucket, "uploads/again.vmdk")
        again = self.wait_image(ec2, self.import_image(ec2, bucket, "uploads/again.vmdk"))
        self.assertEqual("completed", again["Status"])
        self.assertIn("from the cache", again["StatusMessage"])
        self.assertNotEqual(image_id, again["ImageId"])

        # The way back out: the image as a VMDK in the user's bucket, written with the user's keys.
        export_id = ec2.export_image(ImageId=image_id, DiskImageFormat="VMDK",
                                     S3ExportLocation={"S3Bucket": bucket, "S3Prefix": "exports/"}
                                     )["ExportImageTaskId"]
        self.wait_export(ec2, export_id)
        exported = self.path("exported.vmdk")
        store.client.download_file(bucket, f"exports/{export_id}.vmdk", exported)
        converted = qemu_convert_to_raw(exported, self.path("exported.raw"))
        self.assertEqual(sha256(raw), sha256(converted))
        # And as RAW: the stored qcow2 converted back, byte for byte the disk.
        raw_id = ec2.export_image(ImageId=image_id, DiskImageFormat="RAW",
                                  S3ExportLocation={"S3Bucket": bucket, "S3Prefix": "exports/"})["ExportImageTaskId"]
        self.wait_export(ec2, raw_id)
        store.client.download_file(bucket, f"exports/{raw_id}.raw", self.path("exported-raw.raw"))
        self.assertEqual(sha256(raw), sha256(self.path("exported-raw.raw")))
        self.assert_no_work_left()

    def test_import_volume_with_manifest(self):
        self.start("--store-format", "raw")
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()
        _, url = manifest.upload(store, raw, bucket, "vol1/", "RAW", part_size=4 * MiB)
        started = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1},
                                    Image={"Format": "RAW", "Bytes": os.path.getsize(raw),
                                           "ImportManifestUrl": url})["ConversionTask"]
        task = self.wait_conversion(ec2, started["ConversionTaskId"])
        self.assertEqual("completed", task["State"], task)
        volume_id = task["ImportVolume"]["Volume"]["Id"]
        self.assertEqual(os.path.getsize(raw), task["ImportVolume"]["BytesConverted"])
        volume = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
        self.assertEqual(volume_id, volume["VolumeId"])
        # store_format raw: the object is the disk itself.
        with self.db().session() as s:
            resource = s.get(tasks.Resource, volume_id)
            self.assertEqual(("raw", os.path.getsize(raw)), (resource.format, resource.size))
        stored = self.stored_object(resource, self.path("stored.raw"))
        self.assertEqual(sha256(raw), sha256(stored))
        self.assert_no_work_left()

    def test_import_snapshot_by_url_and_import_instance(self):
        self.start()
        ec2, store, bucket, _account = self.user()
        raw, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        url = store.presign("get_object", bucket, "disk.vmdk")
        snap_task = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "Url": url})["ImportTaskId"]
        _, manifest_url = manifest.upload(store, raw, bucket, "inst/", "RAW", part_size=8 * MiB)
        instance_task = ec2.import_instance(
            Platform="Linux", Description="web server", LaunchSpecification={"Architecture": "x86_64"},
            DiskImages=[{"Image": {"Format": "RAW", "Bytes": os.path.getsize(raw),
                                   "ImportManifestUrl": manifest_url}, "Volume": {"Size": 1}}]
        )["ConversionTask"]["ConversionTaskId"]
        deadline = time.monotonic() + 180
        while True:
            snap = ec2.describe_import_snapshot_tasks(ImportTaskIds=[snap_task])["ImportSnapshotTasks"][0]
            if snap["SnapshotTaskDetail"]["Status"] in ("completed", "deleted") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual("completed", snap["SnapshotTaskDetail"]["Status"], snap)
        snapshot_id = snap["SnapshotTaskDetail"]["SnapshotId"]
        self.assertEqual(snapshot_id, ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["SnapshotId"])
        task = self.wait_conversion(ec2, instance_task)
        self.assertEqual("completed", task["State"], task)
        # What an ImportInstance produces here: a registered volume, no instance (so no InstanceId).
        instance = task["ImportInstance"]
        self.assertEqual(("Linux", "web server"), (instance["Platform"], instance["Description"]))
        self.assertNotIn("InstanceId", instance)
        self.assertEqual("completed", instance["Volumes"][0]["Status"])
        volume_id = instance["Volumes"][0]["Volume"]["Id"]
        self.assertRegex(volume_id, r"^vol-[0-9a-f]{17}$")
        self.assertEqual(volume_id, ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["VolumeId"])
        self.assert_no_work_left()


@testtools.skipIf(sf.PostgreSQL.missing(), sf.PostgreSQL.missing())
class TestOnPostgreSQL(PipelineTest):

    def test_import_image_with_postgresql(self):
        """The same workers and claims (SKIP LOCKED) on PostgreSQL: two imports, both completed."""
        pg = self.useFixture(sf.PostgreSQL())
        self.start("--database-url", pg.url, "--cache", "false")
        ec2, store, bucket, _account = self.user()
        _, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        ids = [self.import_image(ec2, bucket, "disk.vmdk") for _ in range(2)]
        found = [self.wait_image(ec2, task_id) for task_id in ids]
        self.assertEqual(["completed"] * 2, [t["Status"] for t in found], found)
        self.assertEqual(2, len({t["ImageId"] for t in found}))
        self.assert_no_work_left()


class TestLimits(PipelineTest):

    def converting_sampler(self):
        """Starts sampling how many tasks convert at once (a task in its store step holds no
        conversion slot) and how many are in the service's hands at all; returns a function
        giving both peaks."""
        db, peak, done = self.db(), {"converting": 0, "running": 0}, threading.Event()

        def sample():
            while not done.wait(0.05):
                with db.session() as s:
                    steps = [step for (step,) in s.query(tasks.Task.step).filter(tasks.Task.state == "converting")]
                peak["converting"] = max(peak["converting"], sum(step != "store" for step in steps))
                peak["running"] = max(peak["running"], len(steps))
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()

        def stop():
            done.set()
            thread.join()
            return peak
        return stop

    def test_concurrency_limit(self):
        self.start("--workers", "1", "--cache", "false")
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()
        store.put_file(raw, bucket, "disk.raw")
        stop = self.converting_sampler()
        ids = [self.import_image(ec2, bucket, "disk.raw", fmt="RAW") for _ in range(3)]
        found = [self.wait_image(ec2, task_id) for task_id in ids]
        self.assertEqual(["completed"] * 3, [t["Status"] for t in found])
        peak = stop()
        self.assertEqual(1, peak["converting"], peak)
        self.assertLessEqual(peak["running"], 2, peak)  # one converting, at most one storing

    def scratch_probe(self, *args):
        """A service whose Linux imports run an operator's validator that writes down how big
        the toolkit's scratch filesystem is (0: the scratch directory is not a mount)."""
        hook = self.path("elements", "test-scratch", "validate.d", "10-scratch")
        os.makedirs(os.path.dirname(hook))
        with open(hook, "w") as f:
            f.write(f'#!/bin/bash\nif mountpoint -q "$IMG_SCRATCH_DIR"; then\n'
                    f'  findmnt -n -b -o SIZE --target "$IMG_SCRATCH_DIR" > {self.path("scratch-size")}\n'
                    f'else echo 0 > {self.path("scratch-size")}; fi\n')
        os.chmod(hook, 0o755)
        self.start("--elements-path", self.path("elements"),
                   "--elements-linux", "mounters validate-linux test-scratch convert-qemu", *args)
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()
        store.put_file(raw, bucket, "disk.raw")
        task = self.wait_image(ec2, self.import_image(ec2, bucket, "disk.raw", fmt="RAW"))
        self.assertEqual("completed", task["Status"], task)
        with open(self.path("scratch-size")) as f:
            return int(f.read())

    def test_toolkit_held_to_the_scratch_space_set(self):
        size = self.scratch_probe("--scratch-space", "300M")
        self.assertTrue(250 * MiB < size <= 300 * MiB, size)  # its filesystem's own metadata aside
        self.assert_no_work_left()

    def test_no_scratch_filesystem_without_a_scratch_space(self):
        # The work directory's free space is the limit then; a filesystem of that size per run
        # would hold the task to nothing the disk does not.
        self.assertEqual(0, self.scratch_probe())
        self.assert_no_work_left()

    def test_scratch_reservation_waits(self):
        """Two tasks, scratch space for one: the second waits, says so, then runs."""
        self.start("--workers", "2", "--cache", "false", "--scratch-space", "60M")
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()  # 26 MiB: a task reserves twice that
        store.put_file(raw, bucket, "disk.raw")
        ids = [self.import_image(ec2, bucket, "disk.raw", fmt="RAW") for _ in range(2)]
        messages = set()
        deadline = time.monotonic() + 180
        while True:
            found = ec2.describe_import_image_tasks(ImportTaskIds=ids)["ImportImageTasks"]
            messages |= {t.get("StatusMessage") for t in found}
            if all(t["Status"] in ("completed", "deleted") for t in found) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(["completed"] * 2, [t["Status"] for t in found], found)
        self.assertTrue(any("waiting for 54525952 bytes of scratch space" in (m or "") for m in messages),
                        messages)
        self.assert_no_work_left()


class TestFaults(PipelineTest):

    def legacy(self, ec2, url, size):
        return ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1},
                                 Image={"Format": "RAW", "Bytes": size, "ImportManifestUrl": url}
                                 )["ConversionTask"]["ConversionTaskId"]

    def test_manifest_faults(self):
        self.start()
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()
        size = os.path.getsize(raw)

        # A truncated part: the task fails naming the part and both sizes.
        _, url = manifest.upload(store, raw, bucket, "trunc/", "RAW", part_size=4 * MiB)
        key = "trunc/disk.raw.part.2"
        store.put_bytes(b"x" * 1000, bucket, key)
        truncated = self.legacy(ec2, url, size)

        # A corrupt first part (same size): the mounters find no disk; the message names step and hook.
        _, url = manifest.upload(store, raw, bucket, "corrupt/", "RAW", part_size=4 * MiB)
        store.put_bytes(os.urandom(4 * MiB), bucket, "corrupt/disk.raw.part.0")
        corrupt = self.legacy(ec2, url, size)

        # A format lie: the manifest says VMDK, the bytes are a raw disk.
        _, url = manifest.upload(store, raw, bucket, "lie/", "VMDK", part_size=4 * MiB)
        lie = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1},
                                Image={"Format": "VMDK", "Bytes": size, "ImportManifestUrl": url}
                                )["ConversionTask"]["ConversionTaskId"]

        # An entity bomb as the manifest: refused without expanding anything.
        bomb = (b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">'
                + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((c,) + (c - 1,) * 10)
                           for c in range(ord("b"), ord("k")))
                + b"]><manifest>&j;</manifest>")
        store.put_bytes(bomb, bucket, "bomb.xml")
        bombed = self.legacy(ec2, store.presign("get_object", bucket, "bomb.xml"), size)

        # A part URL to another host, in an otherwise valid manifest.
        m = manifest.parse(store.client.get_object(Bucket=bucket, Key="trunc/disk.raw.manifest.xml")["Body"].read())
        m.parts[1].get_url = "http://169.254.169.254/latest/meta-data/iam"
        m.parts[1].head_url = None
        store.put_bytes(manifest.build(m), bucket, "elsewhere.xml")
        elsewhere = self.legacy(ec2, store.presign("get_object", bucket, "elsewhere.xml"), size)

        expected = {
            truncated: r"download failed: part 2 \(trunc/disk.raw.part.2\) is 1000 bytes but the manifest says 4194304",
            corrupt: r"failed: hook mount/",
            lie: r"(?i)vmdk",
            bombed: r"the import manifest is refused: .*(DTD|entit)",
            elsewhere: r"part 1 get-url is refused: .*not a configured object store",
        }
        for task_id, pattern in expected.items():
            task = self.wait_conversion(ec2, task_id)
            # A failed legacy task shows cancelled with the reason, so that waiters stop.
            self.assertEqual("cancelled", task["State"], task)
            self.assertRegex(task["StatusMessage"], pattern)
        self.assert_no_work_left()

    def test_missing_part_named_when_the_upload_expires(self):
        self.start("--upload-expiry", "4s")
        ec2, store, bucket, _account = self.user()
        raw, _ = self.vmdk()
        _, url = manifest.upload(store, raw, bucket, "gone/", "RAW", part_size=4 * MiB)
        store.delete(bucket, "gone/disk.raw.part.3")
        task = self.wait_conversion(ec2, self.legacy(ec2, url, os.path.getsize(raw)), timeout=60)
        self.assertEqual("cancelled", task["State"], task)
        self.assertRegex(task["StatusMessage"], r"download failed: the upload did not complete before the task "
                                                r"expired: part 3 \(gone/disk.raw.part.3\) does not exist")
        self.assert_no_work_left()

    def test_disallowed_url_refused_at_submit(self):
        self.start()
        ec2 = self.user()[0]
        for url in ("http://169.254.169.254/latest/meta-data/", "file:///etc/shadow",
                    "http://example.org/disk.vmdk"):
            e = self.assertRaises(ClientError, ec2.import_image,
                                  DiskContainers=[{"Format": "VMDK", "Url": url}])
            self.assertEqual("InvalidParameterValue", e.response["Error"]["Code"], url)

    def test_image_pointing_at_host_files_refused(self):
        """A qcow2 whose backing file is a host file: the toolkit refuses to follow it."""
        self.start()
        ec2, store, bucket, _account = self.user()
        qcow2 = self.path("evil.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", qcow2],
                       check=True)
        store.put_file(qcow2, bucket, "evil.qcow2")
        task = self.wait_image(ec2, self.import_image(ec2, bucket, "evil.qcow2", fmt="QCOW2"))
        self.assertEqual("deleted", task["Status"], task)
        self.assertRegex(task["StatusMessage"], r"validate failed: .*backing file")
        self.assertNotIn(self.service.state_dir, task["StatusMessage"])  # no host paths for the user
        self.assert_no_work_left()

    def test_optional_validator_is_a_warning(self):
        """The operator made the network check optional: an image without network configuration
        imports, with the validator's reason in StatusMessage; a root without fstab still fails."""
        self.start("--optional-validators", "50-linux-network")
        ec2, store, bucket, _account = self.user()
        no_network = linux_disk(self.path("nonet.raw"), self.tmp,
                                remove=("etc/network", "etc/cloud", "usr/bin/cloud-init"))
        store.put_file(no_network, bucket, "nonet.raw")
        no_fstab = linux_disk(self.path("nofstab.raw"), self.tmp, remove=("etc/network", "etc/fstab"))
        store.put_file(no_fstab, bucket, "nofstab.raw")
        warned = self.wait_image(ec2, self.import_image(ec2, bucket, "nonet.raw", fmt="RAW"))
        self.assertEqual("completed", warned["Status"], warned)
        self.assertRegex(warned["StatusMessage"], r"completed with warnings: .*50-linux-network: no DHCP")
        failed = self.wait_image(ec2, self.import_image(ec2, bucket, "nofstab.raw", fmt="RAW"))
        self.assertEqual("deleted", failed["Status"], failed)
        # Named by the user's object, never the work directory's copy.
        self.assertRegex(failed["StatusMessage"], r"^validate failed: hook mount/90-mount-check: "
                                                  rf"s3://{bucket}/nofstab.raw: no recognisable root")
        self.assert_no_work_left()

    def test_full_scratch_space(self):
        self.start("--scratch-space", "1M")
        ec2, store, bucket, _account = self.user()
        _, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        task = self.wait_image(ec2, self.import_image(ec2, bucket, "disk.vmdk"))
        self.assertEqual("deleted", task["Status"])
        self.assertRegex(task["StatusMessage"], r"download failed: the image needs about \d+ bytes of scratch "
                                                r"space .* but the worker has 1048576 in all")
        self.assert_no_work_left()

    def test_part_damaged_after_upload(self):
        """An `imaging import` upload (parts with SHA-256) replaced in the store after the task was
        submitted: the worker's fetch recomputes the checksums and the task fails naming the object."""
        self.start("--workers", "1", "--cache", "false", *self.slow_elements())
        ec2, store, bucket, _account = self.user()
        raw, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "busy.vmdk")
        busy = self.import_image(ec2, bucket, "busy.vmdk")  # holds the only worker
        self.wait_step(busy, "validate")
        imaging_client.upload(store.client, raw, bucket, "disk.raw", quiet=True)
        task_id = self.import_image(ec2, bucket, "disk.raw", fmt="RAW")
        with open(raw, "rb") as f:
            data = bytearray(f.read())
        data[imaging_client.PART_SIZE + 4096] ^= 0xFF  # one byte of part 2
        self.operator_store().put_bytes(bytes(data), bucket, "disk.raw")
        ec2.cancel_import_task(ImportTaskId=busy)
        task = self.wait_image(ec2, task_id, until=("deleted",))
        self.assertRegex(task["StatusMessage"], rf"download failed: s3://{bucket}/disk.raw is corrupt: its "
                                                r"SHA-256 checksum is not the one the store checked at upload")
        self.assert_no_work_left()

    def test_cancel_during_conversion_and_killed_toolkit(self):
        self.start(*self.slow_elements())
        ec2, store, bucket, _account = self.user()
        _, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        first = self.import_image(ec2, bucket, "disk.vmdk")
        self.wait_step(first, "validate")
        time.sleep(2)  # the slow validator runs, the image is mounted
        asked = time.monotonic()
        ec2.cancel_import_task(ImportTaskId=first)
        task = self.wait_image(ec2, first, until=("deleted",))
        self.assertLess(time.monotonic() - asked, 5)
        self.assert_no_work_left()

        # The toolkit child killed (as by the OOM killer): failed, explained, everything released.
        second = self.import_image(ec2, bucket, "disk.vmdk")
        self.wait_step(second, "validate")
        time.sleep(2)
        children = subprocess.run(["pgrep", "-f", f"imaging_service.runtask {self.service.state_dir}/work/{second}"],
                                  stdout=subprocess.PIPE, text=True, check=False).stdout.split()
        self.assertTrue(children)
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        task = self.wait_image(ec2, second, until=("deleted",))
        self.assertRegex(task["StatusMessage"], r"validate failed: the toolkit process was killed by signal 9; "
                                                r"its work directory was cleaned")
        self.assert_no_work_left()

    def test_orderly_stop_hands_the_task_back(self):
        """SIGTERM to `serve`: the running task is pending at once, its attempt not counted, and the
        restarted service takes it without waiting for --orphan-after (here an hour)."""
        service = self.start("--orphan-after", "1h", *self.slow_elements())
        ec2, store, bucket, _account = self.user()
        _, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        task_id = self.import_image(ec2, bucket, "disk.vmdk")
        self.wait_step(task_id, "validate")
        asked = time.monotonic()
        service.stop(signal.SIGTERM)
        self.assertLess(time.monotonic() - asked, 15)
        with self.db().session() as s:
            task = s.get(tasks.Task, task_id)
            self.assertEqual(("pending", 0, None), (task.state, task.attempts, task.worker_id))
            self.assertIn("handed back", task.status_message)
        self.assertEqual([], os.listdir(os.path.join(service.state_dir, "work")))
        service.start()
        self.wait_step(task_id, "validate", timeout=30)
        with self.db().session() as s:
            self.assertEqual(1, s.get(tasks.Task, task_id).attempts)
        ec2.cancel_import_task(ImportTaskId=task_id)
        self.assertEqual("deleted", self.wait_image(ec2, task_id, until=("deleted",))["Status"])
        self.assert_no_work_left()

    def test_service_killed_and_restarted(self):
        service = self.start(*self.slow_elements())
        ec2, store, bucket, _account = self.user()
        _, vmdk = self.vmdk()
        store.put_file(vmdk, bucket, "disk.vmdk")
        task_id = self.import_image(ec2, bucket, "disk.vmdk")
        self.wait_step(task_id, "validate")
        time.sleep(2)
        service.stop(signal.SIGKILL)
        # The toolkit child gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and releases its mounts;
        # the object store gets SIGKILL the same way.
        for what, timeout in ((f"{service.state_dir}/work", 20), (f"{service.state_dir}/seaweedfs", 5)):
            deadline = time.monotonic() + timeout
            while processes_of(what):
                self.assertLess(time.monotonic(), deadline, f"a process of {what} outlived the service")
                time.sleep(0.5)
        service.start()
        with self.db().session() as s:
            self.assertIn(s.get(tasks.Task, task_id).state, ("converting", "pending"))
        # Its worker is gone: retried (attempt 2), which the slow validator makes run again.
        deadline = time.monotonic() + 60
        while True:
            with self.db().session() as s:
                task = s.get(tasks.Task, task_id)
                if task.attempts >= 2 and task.state == "converting":
                    break
            self.assertLess(time.monotonic(), deadline, f"{task.state} {task.attempts} {task.status_message}")
            time.sleep(0.5)
        ec2.cancel_import_task(ImportTaskId=task_id)
        self.assertEqual("deleted", self.wait_image(ec2, task_id, until=("deleted",))["Status"])
        self.assert_no_work_left()


class TestInstanceValidation(PipelineTest):
    """The one test with instance validation on: the toolkit boots the image (qemu TCG, 30 s+)."""

    def test_import_image_boots(self):
        from tests.test_instance_e2e import STOCK, debian_boot_vmdk
        image = debian_boot_vmdk()
        self.start("--instance-validation", "true")
        ec2, store, bucket, _account = self.user()
        store.put_file(image, bucket, "debian.vmdk")
        task = self.wait_image(ec2, self.import_image(ec2, bucket, "debian.vmdk"), timeout=1200)
        self.assertEqual("completed", task["Status"], task)
        with self.db().session() as s:
            validators = s.get(tasks.Task, task["ImportTaskId"]).result["validators"]
        booted = {v["hook"]: v["result"] for v in validators if v["hook"] in STOCK}
        self.assertEqual(dict.fromkeys(STOCK, "ok"), booted, validators)
        self.assert_no_work_left()
