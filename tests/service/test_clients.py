"""The client commands against a real running service (embedded store and workers):
`imaging` (import with upload, follow, list, status, wait, logs, cancel) and the
euca2ools-compatible euca-* commands (manifest upload, resume, describe, cancel,
delete-disk-image)."""

import json
import os
import subprocess
import sys
import time

import boto3
import botocore.config
import testtools

from imaging_service import manifest as import_manifest
from imaging_service.clients import euca_import
from imaging_service.objectstore import ObjectStore, ObjectStoreError
from tests.guestimages import linux_disk
from tests.service import fixtures as sf
from tests.service.celery_fixtures import WHY_NOT, CeleryEngine, CeleryService
from tests.service.test_pipeline import FAST, PipelineTest


class ClientsTest(PipelineTest):

    def setUp(self):
        super().setUp()
        self.start()
        self.access, self.secret, self.account = self.service.credential()
        self.bucket = f"{self.account}-clients"
        store = ObjectStore(self.s3_url, "us-east-1", self.access, self.secret)
        deadline = time.monotonic() + 30  # the service gives the store new keys within seconds
        while True:
            try:
                store.ensure_bucket(self.bucket)
                break
            except ObjectStoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    @property
    def s3_url(self):
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self):
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access, AWS_SECRET_ACCESS_KEY=self.secret,
                   AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_EC2=self.service.url,
                   AWS_ENDPOINT_URL_S3=self.s3_url, TMPDIR=self.tmp)
        env.pop("AWS_PROFILE", None)
        return env

    def run_cli(self, module_args, *args, expect=0):
        result = subprocess.run([sys.executable, "-m", *module_args, *map(str, args)], capture_output=True,
                                text=True, env=self.env(), timeout=300, check=False)
        if expect is not None:
            self.assertEqual(expect, result.returncode,
                             f"{module_args} {args}:\n{result.stdout}\n{result.stderr}\n{self.service.log()[-2000:]}")
        return result

    def imaging(self, *args, expect=0):
        return self.run_cli(["imaging_service.clients.imaging"], *args, expect=expect)

    def euca(self, name, *args, expect=0):
        return self.run_cli(["imaging_service.clients.euca_import", name], *args, expect=expect)

    def s3(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.s3_url, region_name="us-east-1", aws_access_key_id=self.access,
            aws_secret_access_key=self.secret, config=botocore.config.Config(s3={"addressing_style": "path"}))

    def keys(self):
        return sorted(o["Key"] for o in self.s3().list_objects_v2(Bucket=self.bucket).get("Contents", []))

    # ---- imaging ------------------------------------------------------------------------------------------

    def test_imaging_import_follow_and_list(self):
        _, vmdk = self.vmdk()
        result = self.imaging("import", vmdk, "--bucket", self.bucket, "-p", "Linux", "-d", "from the CLI")
        # Both bars (upload in bytes with its rate, conversion in %) went to stderr.
        self.assertIn("upload", result.stderr)
        self.assertIn("convert", result.stderr)
        self.assertIn("B/s", result.stderr)
        task_id, status, _progress, image = result.stdout.split("\t")[:4]
        self.assertEqual("completed", status, result.stdout)
        self.assertTrue(image.startswith("ami-"), result.stdout)
        self.assertEqual(["disk.vmdk"], self.keys())

        listing = json.loads(self.imaging("list", "--json").stdout)
        self.assertEqual([task_id], [t["id"] for t in listing])
        self.assertEqual("completed", json.loads(self.imaging("status", task_id, "--json").stdout)["status"])
        self.assertEqual(0, self.imaging("wait", task_id, "-q").returncode)
        logs = self.imaging("logs", task_id).stdout
        self.assertIn("completed", logs)
        # The toolkit's events the service kept: every hook with its result and duration, the report.
        self.assertRegex(logs, r"hook validate/\S+: ok in \d+\.\d s")
        self.assertRegex(logs, r"hook convert/\S+: ok in \d+\.\d s")
        self.assertIn("inspection report:", logs)
        found = json.loads(self.imaging("logs", task_id, "--json").stdout)
        hooks = [e for e in found["events"] if e["event"] == "hook-end"]
        self.assertIn(("validate", "10-linux-release", "ok"), [(e["phase"], e["hook"], e["result"]) for e in hooks])
        self.assertIn(("convert", "55-qemu-to-qemu", "ok"), [(e["phase"], e["hook"], e["result"]) for e in hooks])
        self.assertFalse(any(self.service.state_dir in json.dumps(e) for e in found["events"]))
        self.assertEqual("debian", found["inspection"]["distro"])
        # Another account's task, or none: the same answer.
        self.assertIn("does not exist", self.imaging("logs", "import-ami-00000000000000000", expect=1).stderr)

    def test_imaging_import_default_bucket(self):
        """No --bucket: the account from DescribeAccountAttributes, the bucket ACCOUNT-imports made."""
        ec2 = self.service.client(self.access, self.secret)
        values = {a["AttributeName"]: [v["AttributeValue"] for v in a["AttributeValues"]]
                  for a in ec2.describe_account_attributes()["AccountAttributes"]}
        self.assertEqual([self.account], values["account-id"])
        raw, _ = self.vmdk()
        result = self.imaging("import", raw, "-f", "raw", "-p", "Linux", "--no-wait", "--json")
        task = json.loads(result.stdout)
        found = self.s3().list_objects_v2(Bucket=f"{self.account}-imports")["Contents"]
        self.assertEqual(["disk.raw"], [o["Key"] for o in found])
        self.assertEqual(f"{self.account}-imports", ec2.describe_import_image_tasks(ImportTaskIds=[task["id"]])[
            "ImportImageTasks"][0]["SnapshotDetails"][0]["UserBucket"]["S3Bucket"])
        ec2.cancel_import_task(ImportTaskId=task["id"])

    def test_imaging_wait_stops_on_a_failure(self):
        ec2 = self.service.client(self.access, self.secret)
        task_id = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": self.bucket, "S3Key": "missing.vmdk"}}], Platform="Linux")["ImportTaskId"]
        started = time.monotonic()
        result = self.imaging("wait", task_id, "--json", "--timeout", "120", expect=1)
        self.assertLess(time.monotonic() - started, 100)
        view = json.loads(result.stdout)
        self.assertEqual("deleted", view["status"])
        self.assertIn("missing.vmdk", view["message"])

    def test_imaging_refuses_before_upload(self):
        raw = linux_disk(self.path("disk.raw"), self.tmp)
        # A file that is not the declared format.
        result = self.imaging("import", raw, "--bucket", self.bucket, "-f", "vmdk", expect=1)
        self.assertIn("disk.raw", result.stderr)
        self.assertIn("declared as vmdk but the content is raw", result.stderr)
        # A qcow2 that reaches for another file of the host.
        overlay = self.path("overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", overlay],
                       check=True)
        result = self.imaging("import", overlay, "--bucket", self.bucket, expect=1)
        self.assertIn("overlay.qcow2", result.stderr)
        self.assertIn("backing file", result.stderr)
        self.assertEqual([], self.keys())  # nothing was uploaded
        self.assertEqual([], json.loads(self.imaging("list", "--json").stdout))

    def test_part_checksums_checked_by_the_reader(self):
        """What `imaging import` uploads carries SHA-256 checksums per part; the worker's check
        (imaging_service.integrity) passes on the object and names a damaged byte's object."""
        from imaging_service import integrity
        from imaging_service.clients import imaging
        path = self.path("random.img")
        with open(path, "wb") as f:
            f.write(os.urandom(20 * 1024 * 1024))  # three 8 MiB parts
        s3 = self.s3()
        imaging.upload(s3, path, self.bucket, "random.img", quiet=True)
        body = s3.get_object(Bucket=self.bucket, Key="random.img")["Body"].read()

        check = integrity.expected(s3, self.bucket, "random.img")
        self.assertEqual([8 << 20, 8 << 20, 4 << 20], check.sizes)
        for i in range(0, len(body), 1 << 20):
            check.update(body[i:i + (1 << 20)])
        check.verify()

        damaged = bytearray(body)
        damaged[9 << 20] ^= 1  # in the second part
        check = integrity.expected(s3, self.bucket, "random.img")
        check.update(bytes(damaged))
        with self.assertRaises(integrity.IntegrityError) as e:
            check.verify()
        self.assertIn(f"s3://{self.bucket}/random.img is corrupt", str(e.exception))

        check = integrity.expected(s3, self.bucket, "random.img")
        check.update(body[:-1])
        with self.assertRaises(integrity.IntegrityError):
            check.verify()

        # A damaged part is refused by the store as it arrives (the checksum travels with it).
        from botocore.exceptions import ClientError
        with self.assertRaises(ClientError) as e:
            s3.put_object(Bucket=self.bucket, Key="bad", Body=b"hello",
                          ChecksumSHA256="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        self.assertEqual("BadDigest", e.exception.response["Error"]["Code"])

    # ---- euca2ools' commands ------------------------------------------------------------------------

    def test_euca_import_volume_describe(self):
        _, vmdk = self.vmdk()
        size = os.path.getsize(vmdk)
        out = self.euca("euca-import-volume", vmdk, "-f", "vmdk", "-z", "us-east-1a", "-b", self.bucket,
                        "--image-size", size, "--prefix", "imports", "-d", "legacy").stdout.splitlines()
        task_line, disk_line = out
        fields = task_line.split("\t")
        self.assertEqual(["TaskType", "IMPORTVOLUME", "TaskId"], fields[:3])
        task_id = fields[3]
        self.assertTrue(task_id.startswith("import-vol-"))
        self.assertIn("Status\tactive", task_line)
        self.assertTrue(disk_line.startswith(f"DISKIMAGE\tDiskImageFormat\tVMDK\tDiskImageSize\t{size}\t"),
                        disk_line)
        self.assertIn("AvailabilityZone\tus-east-1a", disk_line)
        # The manifest and its part were uploaded under the prefix, as euca2ools lays them out.
        keys = self.keys()
        self.assertEqual(2, len(keys), keys)
        self.assertTrue(all(k.startswith("imports/") for k in keys), keys)
        manifest_key = next(k for k in keys if k.endswith(".manifest.xml"))
        parsed = import_manifest.parse(self.s3().get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read())
        self.assertEqual(("VMDK", size, 1), (parsed.file_format, parsed.size, parsed.volume_size))
        self.assertTrue(parsed.self_destruct_url and all(p.head_url and p.get_url and p.delete_url
                                                         for p in parsed.parts))
        deadline = time.monotonic() + 180
        while True:
            lines = self.euca("euca-describe-conversion-tasks", task_id).stdout.splitlines()
            if "Status\tcompleted" in lines[0]:
                break
            self.assertNotIn("Status\tcancelled", lines[0], lines)
            self.assertLess(time.monotonic(), deadline, lines)
            time.sleep(1)
        self.assertIn("VolumeId\tvol-", lines[1])
        # All tasks: the same lines.
        self.assertEqual(lines, self.euca("euca-describe-conversion-tasks").stdout.splitlines())

    def test_euca_resume_sends_only_missing_parts_then_cancel_and_delete(self):
        raw = linux_disk(self.path("disk.raw"), self.tmp)  # 24 MiB: three 10 MiB parts
        size = os.path.getsize(raw)
        out = self.euca("euca-import-volume", raw, "-f", "raw", "-z", "us-east-1a", "-b", self.bucket,
                        "--no-upload").stdout
        task_id = out.split("\t")[3]
        self.assertEqual([], self.keys())  # --no-upload: nothing yet

        # The first upload breaks after one part (a network failure).
        ec2 = self.service.client(self.access, self.secret)
        broken = _FailAfter(self.s3(), puts=2)  # the manifest and part 0
        with self.assertRaises(ConnectionError):
            euca_import.resume(ec2, broken, task_id, raw, show_progress=False)
        keys = self.keys()
        self.assertEqual(2, len(keys), keys)
        part0 = next(k for k in keys if k.endswith(".part.0"))
        before = self.s3().head_object(Bucket=self.bucket, Key=part0)

        # Cancel before the rest arrives: the task stays waiting for its upload until then.
        self.euca("euca-cancel-conversion-task", task_id)
        self.assertIn("Status\tcancelled", self.euca("euca-describe-conversion-tasks", task_id).stdout)

        # The resume sends only the missing parts (part 0 is found by HEAD and kept as it was).
        self.euca("euca-resume-import", raw, "-t", task_id)
        keys = self.keys()
        self.assertEqual(4, len(keys), keys)
        after = self.s3().head_object(Bucket=self.bucket, Key=part0)
        self.assertEqual((before["ETag"], before["LastModified"]), (after["ETag"], after["LastModified"]))
        parts = sorted(k for k in keys if ".part." in k)
        self.assertEqual(size, sum(self.s3().head_object(Bucket=self.bucket, Key=k)["ContentLength"] for k in parts))

        # A file of another size is refused.
        other = self.path("other.raw")
        with open(other, "wb") as f:
            f.truncate(size + 512)
        result = self.euca("euca-resume-import", other, "-t", task_id, expect=1)
        self.assertIn("is not the same size as the file the import started with", result.stderr)

        # delete-disk-image removes the parts and the manifest.
        self.euca("euca-delete-disk-image", "-t", task_id)
        self.assertEqual([], self.keys())

    def test_euca_import_refuses_a_format_lie(self):
        raw = linux_disk(self.path("disk.raw"), self.tmp)
        result = self.euca("euca-import-volume", raw, "-f", "vhd", "-z", "us-east-1a", "-b", self.bucket,
                           "--image-size", os.path.getsize(raw), expect=1)
        self.assertIn("declared as vhd but the content is raw", result.stderr)
        self.assertEqual([], self.keys())
        self.assertEqual("", self.euca("euca-describe-conversion-tasks").stdout)


class _FailAfter:
    """An S3 client whose connection drops after `puts` uploads (the first resume's network failure)."""

    def __init__(self, client, puts):
        self._client, self._left = client, puts

    def put_object(self, **kwargs):
        if self._left <= 0:
            raise ConnectionError("the network went away")
        self._left -= 1
        return self._client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


# ---- the same commands on the celery engine --------------------------------------------------------

@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestClientsCelery(CeleryEngine, ClientsTest):
    """Every test above against a celery front-end and one `imaging-service worker` process (its
    own state and work directory), PostgreSQL, RabbitMQ and the object store (SeaweedFS) shared
    by the class (tests/service/celery_fixtures.py)."""

    def start(self, *args, state_dir=None):
        servers = self.servers
        self.s3_port = servers.seaweed.port
        operator = json.loads(sf.cli("credentials", "create", "--json", "--operator", "--state-dir",
                                     self.path("admin")).stdout)
        servers.sync_identities()
        store = ["--s3-endpoint", servers.seaweed.endpoint_url, "--s3-access-key", operator["access_key"],
                 f"--s3-secret-key={operator['secret_key']}"]  # "=": a secret may start with "-"
        self.celery_worker(*FAST, *store, *args)
        self.service = self.useFixture(CeleryService(servers, args=[*FAST, *store, *args], start_timeout=120,
                                                     state_dir=state_dir or self.path("state")))
        return self.service
