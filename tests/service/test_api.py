"""The API through real clients: `imaging-service serve` (uvicorn, SQLite in a temporary
state directory, no workers; URLs are allowed on STORE, an object store that is never
contacted here) with boto3's `ec2` client and the AWS CLI, both unchanged."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request

import testtools
from botocore.exceptions import ClientError

from imaging_service import tasks
from imaging_service.db import Database
from tests.service import fixtures as sf
from tests.service.celery_fixtures import WHY_NOT, CeleryEngine

BUCKET = {"S3Bucket": "images", "S3Key": "disk.vmdk"}
STORE = "http://127.0.0.1:9"


class APITestCase(testtools.TestCase):
    # "none": the API without workers, so that tasks stay as the tests make them; the same
    # tests on celery front-ends (no worker either): the *Celery classes at the end.
    engine = "none"

    def setUp(self):
        super().setUp()
        # healthy=False on celery: its /healthz checks the store too, and STORE never answers.
        self.service = self.useFixture(sf.Service(engine=self.engine, args=["--s3-endpoint", STORE],
                                                  healthy=self.engine != "celery"))
        self.access, self.secret, self.account = self.service.credential()
        self.ec2 = self.service.client(self.access, self.secret)

    def assertError(self, code, call, *args, **kwargs):
        e = self.assertRaises(ClientError, call, *args, **kwargs)
        self.assertEqual(code, e.response["Error"]["Code"], e.response["Error"].get("Message"))
        return e

    def db(self):
        db = Database(self.service.database_url)
        self.addCleanup(db.dispose)
        return db


class TestImportImage(APITestCase):

    def import_image(self, **kwargs):
        args = {"DiskContainers": [{"Format": "VMDK", "UserBucket": BUCKET, "Description": "disk"}],
                "Description": "my image", "Platform": "Linux"}
        args.update(kwargs)
        return self.ec2.import_image(**args)

    def test_submit_describe_cancel(self):
        started = self.import_image()
        task_id = started["ImportTaskId"]
        self.assertRegex(task_id, r"^import-ami-[0-9a-f]{17}$")
        self.assertEqual(("active", "pending"), (started["Status"], started["StatusMessage"]))
        found = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
        self.assertEqual(1, len(found))
        task = found[0]
        self.assertEqual((task_id, "active", "Linux", "my image"),
                         (task["ImportTaskId"], task["Status"], task["Platform"], task["Description"]))
        self.assertEqual({"S3Bucket": "images", "S3Key": "disk.vmdk"}, task["SnapshotDetails"][0]["UserBucket"])
        self.assertEqual("VMDK", task["SnapshotDetails"][0]["Format"])
        cancelled = self.ec2.cancel_import_task(ImportTaskId=task_id, CancelReason="changed my mind")
        self.assertEqual(("active", "deleted"), (cancelled["PreviousState"], cancelled["State"]))
        task = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual(("deleted", "changed my mind"), (task["Status"], task["StatusMessage"]))
        self.assertError("IncorrectState", self.ec2.cancel_import_task, ImportTaskId=task_id)

    def test_progress_and_completion_are_shown(self):
        task_id = self.import_image()["ImportTaskId"]
        db = self.db()
        claimed = tasks.claim(db, "worker-1")
        self.assertEqual(task_id, claimed.id)
        self.assertTrue(tasks.progress(db, task_id, "worker-1", step="convert", progress=45,
                                       bytes_done=450, bytes_total=1000))
        task = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual(("active", "converting", "45"), (task["Status"], task["StatusMessage"], task["Progress"]))
        self.assertEqual(1000.0, task["SnapshotDetails"][0]["DiskImageSize"])
        done = tasks.complete(db, task_id, "worker-1", {"platform": "linux"}, [
            {"kind": "image", "bucket": "service", "key": "ami.raw", "size": 3 * 1024 ** 3, "format": "raw",
             "platform": "linux", "architecture": "x86_64"},
            {"kind": "snapshot", "bucket": "service", "key": "ami.raw", "size": 3 * 1024 ** 3, "format": "raw"}])
        task = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual("completed", task["Status"])
        self.assertEqual(done.result["image_id"], task["ImageId"])
        self.assertEqual(done.result["snapshot_id"], task["SnapshotDetails"][0]["SnapshotId"])
        image = self.ec2.describe_images(ImageIds=[task["ImageId"]])["Images"][0]
        self.assertEqual((self.account, "available", "x86_64"),
                         (image["OwnerId"], image["State"], image["Architecture"]))
        self.assertEqual([task["ImageId"]], [i["ImageId"] for i in self.ec2.describe_images(Owners=["self"])["Images"]])
        snap = self.ec2.describe_snapshots(SnapshotIds=[done.result["snapshot_id"]])["Snapshots"][0]
        self.assertEqual((3, "completed"), (snap["VolumeSize"], snap["State"]))
        self.assertError("InvalidAMIID.NotFound", self.ec2.describe_images, ImageIds=["ami-0123456789abcdef0"])
        self.assertError("InvalidAMIID.Malformed", self.ec2.describe_images, ImageIds=["ami-xyz"])

    def test_describe_resources_filters_and_pages(self):
        """DescribeImages/Snapshots/Volumes: Filters (AWS names, * and ? wildcards, every filter
        must match, any value) and MaxResults/NextToken pages, as AWS does."""
        db = self.db()
        made = []
        for i, (platform, gib) in enumerate((("linux", 1), ("windows", 2), ("linux", 3), ("linux", 4),
                                             ("linux", 5), ("linux", 6))):
            task_id = self.import_image(Description=f"n{i}")["ImportTaskId"]
            self.assertEqual(task_id, tasks.claim(db, "w").id)
            made.append(tasks.complete(db, task_id, "w", {"platform": platform}, [
                {"kind": "image", "bucket": "service", "key": f"{i}.raw", "size": gib * 1024 ** 3, "format": "raw",
                 "platform": platform, "architecture": "x86_64"},
                {"kind": "snapshot", "bucket": "service", "key": f"{i}.raw", "size": gib * 1024 ** 3,
                 "format": "raw"},
                {"kind": "volume", "bucket": "service", "key": f"{i}.raw", "size": gib * 1024 ** 3,
                 "format": "raw"}]).result)
        images = [m["image_id"] for m in made]
        snapshots = [m["snapshot_id"] for m in made]

        def ids(found, key):
            return sorted(x[key] for x in found)
        windows = self.ec2.describe_images(Filters=[{"Name": "platform", "Values": ["windows"]}])["Images"]
        self.assertEqual([images[1]], ids(windows, "ImageId"))
        found = self.ec2.describe_images(Filters=[
            {"Name": "image-id", "Values": [images[0][:6] + "*", images[2]]},
            {"Name": "architecture", "Values": ["x86_?4"]}])["Images"]
        self.assertEqual(sorted({images[0], images[2]} | {i for i in images if i.startswith(images[0][:6])}),
                         ids(found, "ImageId"))
        self.assertEqual([], self.ec2.describe_images(Filters=[{"Name": "state", "Values": ["pending"]}])["Images"])
        self.assertEqual([], self.ec2.describe_images(Filters=[{"Name": "tag:Name", "Values": ["x"]}])["Images"])
        big = self.ec2.describe_snapshots(Filters=[{"Name": "volume-size", "Values": ["5", "6"]},
                                                   {"Name": "status", "Values": ["completed"]}])["Snapshots"]
        self.assertEqual(sorted(snapshots[4:]), ids(big, "SnapshotId"))
        volumes = self.ec2.describe_volumes(Filters=[{"Name": "size", "Values": ["2"]}])["Volumes"]
        self.assertEqual([made[1]["volume_id"]], ids(volumes, "VolumeId"))
        self.assertError("InvalidParameterValue", self.ec2.describe_images,
                         Filters=[{"Name": "no-such-filter", "Values": ["x"]}])

        # Pages: every item once, in order, the last page without a NextToken.
        for call, key, field in ((self.ec2.describe_images, "Images", "ImageId"),
                                 (self.ec2.describe_snapshots, "Snapshots", "SnapshotId"),
                                 (self.ec2.describe_volumes, "Volumes", "VolumeId")):
            seen, pages, token = [], 0, None
            while True:
                page = call(MaxResults=5, **({"NextToken": token} if token else {}))
                seen += [x[field] for x in page[key]]
                pages += 1
                token = page.get("NextToken")
                if not token:
                    break
            self.assertEqual((2, 6, 6), (pages, len(seen), len(set(seen))), (key, seen))
        self.assertError("InvalidParameterValue", self.ec2.describe_images, MaxResults=5, NextToken="bm90LWFuLWlk")
        self.assertError("InvalidParameterValue", self.ec2.describe_snapshots, MaxResults=2)
        self.assertError("InvalidParameterCombination", self.ec2.describe_volumes, MaxResults=5,
                         VolumeIds=[volumes[0]["VolumeId"]])

    def test_failure_shows_deleted_with_the_reason(self):
        task_id = self.import_image()["ImportTaskId"]
        db = self.db()
        tasks.claim(db, "w")
        tasks.fail(db, task_id, "w", "validate: validate-linux/50-fstab failed: /etc/fstab names a missing UUID")
        task = self.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        self.assertEqual("deleted", task["Status"])
        self.assertIn("50-fstab", task["StatusMessage"])

    def test_client_token(self):
        first = self.import_image(ClientToken="token-1")
        again = self.import_image(ClientToken="token-1")
        self.assertEqual(first["ImportTaskId"], again["ImportTaskId"])
        self.assertError("IdempotentParameterMismatch", self.import_image, ClientToken="token-1",
                         Description="another image")
        other = self.import_image(ClientToken="token-2")
        self.assertNotEqual(first["ImportTaskId"], other["ImportTaskId"])
        # Another key of the same account repeating the request gets the same task.
        result = sf.cli("credentials", "create", "--json", "--account", self.account,
                        "--state-dir", self.service.state_dir)
        second = json.loads(result.stdout)
        ec2 = self.service.client(second["access_key"], second["secret_key"])
        again = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": BUCKET, "Description": "disk"}],
                                 Description="my image", Platform="Linux", ClientToken="token-1")
        self.assertEqual(first["ImportTaskId"], again["ImportTaskId"])

    def test_dry_run(self):
        self.assertError("DryRunOperation", self.import_image, DryRun=True)
        self.assertEqual([], self.ec2.describe_import_image_tasks()["ImportImageTasks"])
        # A dry run still checks the parameters.
        self.assertError("InvalidParameterValue", self.import_image, DryRun=True,
                         DiskContainers=[{"Format": "ISO", "UserBucket": BUCKET}])

    def test_bad_parameters(self):
        e = self.assertError("InvalidParameterValue", self.import_image,
                             DiskContainers=[{"Format": "ISO", "UserBucket": BUCKET}])
        self.assertIn("DiskContainer.1.Format", e.response["Error"]["Message"])
        self.assertError("MissingParameter", self.import_image, DiskContainers=[{"Format": "VMDK"}])
        e = self.assertError("InvalidParameterValue", self.import_image,
                             DiskContainers=[{"Format": "VMDK", "Url": "http://169.254.169.254/latest/meta-data"}])
        self.assertIn("DiskContainer.1.Url", e.response["Error"]["Message"])
        self.assertError("InvalidParameterValue", self.import_image,
                         DiskContainers=[{"Format": "VMDK", "Url": "file:///etc/shadow"}])
        e = self.assertError("InvalidParameterValue", self.import_image, Encrypted=True)
        self.assertIn("Encrypted", e.response["Error"]["Message"])

    def test_filters_and_pages(self):
        ids = [self.import_image()["ImportTaskId"] for _ in range(5)]
        self.ec2.cancel_import_task(ImportTaskId=ids[0])
        seen, token = [], None
        while True:
            page = self.ec2.describe_import_image_tasks(MaxResults=2, **({"NextToken": token} if token else {}))
            seen += [t["ImportTaskId"] for t in page["ImportImageTasks"]]
            self.assertLessEqual(len(page["ImportImageTasks"]), 2)
            token = page.get("NextToken")
            if not token:
                break
        self.assertEqual(ids, seen)
        active = self.ec2.describe_import_image_tasks(Filters=[{"Name": "task-state", "Values": ["active"]}])
        self.assertEqual(ids[1:], [t["ImportTaskId"] for t in active["ImportImageTasks"]])
        deleted = self.ec2.describe_import_image_tasks(Filters=[{"Name": "task-state", "Values": ["deleted"]}])
        self.assertEqual(ids[:1], [t["ImportTaskId"] for t in deleted["ImportImageTasks"]])
        self.assertError("InvalidParameterValue", self.ec2.describe_import_image_tasks,
                         Filters=[{"Name": "owner", "Values": ["x"]}])
        self.assertError("InvalidParameterValue", self.ec2.describe_import_image_tasks, NextToken="garbage")

    def test_active_task_cap(self):
        db = self.db()
        for _ in range(20):
            tasks.submit(db, self.account, "import-image", {"source": {"bucket": "b", "key": "k"}})
        self.assertError("ResourceLimitExceeded", self.import_image)

    def test_import_snapshot(self):
        started = self.ec2.import_snapshot(DiskContainer={"Format": "RAW", "UserBucket": BUCKET},
                                           Description="snap")
        task_id = started["ImportTaskId"]
        self.assertRegex(task_id, r"^import-snap-")
        found = self.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]
        detail = found["SnapshotTaskDetail"]
        self.assertEqual(("active", "RAW"), (detail["Status"], detail["Format"]))
        self.assertEqual("deleted", self.ec2.cancel_import_task(ImportTaskId=task_id)["State"])


class TestErrorsAndIsolation(APITestCase):

    def test_tenant_isolation(self):
        mine = self.ec2.import_image(DiskContainers=[{"Format": "RAW", "UserBucket": BUCKET}])["ImportTaskId"]
        access, secret, _ = self.service.credential()
        other = self.service.client(access, secret)
        missing = "import-ami-0123456789abcdef0"
        for task_id in (mine, missing):  # answered alike
            e = self.assertError("InvalidConversionTaskId", other.describe_import_image_tasks, ImportTaskIds=[task_id])
            self.assertIn(task_id, e.response["Error"]["Message"])
            self.assertError("InvalidConversionTaskId", other.cancel_import_task, ImportTaskId=task_id)
        self.assertEqual([], other.describe_import_image_tasks()["ImportImageTasks"])
        tasks = self.ec2.describe_import_image_tasks(ImportTaskIds=[mine])["ImportImageTasks"]
        self.assertEqual("active", tasks[0]["Status"])

    def test_malformed_ids(self):
        self.assertError("InvalidConversionTaskId.Malformed", self.ec2.describe_import_image_tasks,
                         ImportTaskIds=["import-vol-12345678"])
        self.assertError("InvalidConversionTaskId.Malformed", self.ec2.describe_conversion_tasks,
                         ConversionTaskIds=["nonsense"])
        self.assertError("InvalidConversionTaskId.Malformed", self.ec2.cancel_conversion_task,
                         ConversionTaskId="import-ami-0123456789abcdef0")
        self.assertError("InvalidConversionTaskId", self.ec2.describe_conversion_tasks,
                         ConversionTaskIds=["import-vol-0123abcd"])

    def test_auth_errors(self):
        self.assertError("AuthFailure", self.service.client("AKIANOBODY", "x").describe_conversion_tasks)
        self.assertError("SignatureDoesNotMatch", self.service.client(self.access, "wrong").describe_conversion_tasks)
        subprocess.run([sys.executable, "-m", "imaging_service.cli", "credentials", "revoke", self.access,
                        "--state-dir", self.service.state_dir], check=True, stdout=subprocess.PIPE)
        # A revocation by another process is seen within the credential cache's 5 s.
        deadline = time.monotonic() + 10
        while True:
            try:
                self.ec2.describe_conversion_tasks()
            except ClientError as e:
                self.assertEqual("AuthFailure", e.response["Error"]["Code"])
                break
            self.assertLess(time.monotonic(), deadline, "the revoked key still works")
            time.sleep(0.5)
        access, secret, _ = self.service.credential()
        self.service.client(access, secret).describe_conversion_tasks()

    def test_invalid_action_and_unsigned(self):
        self.assertError("InvalidAction", self.ec2.describe_instances)
        with urllib.request.urlopen(self.service.url + "/healthz") as r:
            health = json.load(r)
        self.assertEqual("ok", health["toolkit"])
        self.assertEqual("ok", health["database"])
        request = urllib.request.Request(self.service.url + "/", data=b"Action=DescribeConversionTasks")
        e = self.assertRaises(urllib.error.HTTPError, urllib.request.urlopen, request)
        self.assertEqual(401, e.code)
        self.assertIn(b"<Code>AuthFailure</Code>", e.read())
        e.close()

    def test_browser_at_root_goes_to_the_queue_page(self):
        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args):
                return None
        opener = urllib.request.build_opener(NoRedirect)
        request = urllib.request.Request(self.service.url + "/", headers={"Accept": "text/html,*/*;q=0.8"})
        e = self.assertRaises(urllib.error.HTTPError, opener.open, request)
        with e:
            self.assertEqual((303, "/queue"), (e.code, e.headers["Location"]))
        # Not a browser: the EC2 API answers (unsigned: AuthFailure).
        e = self.assertRaises(urllib.error.HTTPError, opener.open, self.service.url + "/")
        with e:
            self.assertEqual(401, e.code)
            self.assertIn(b"<Code>AuthFailure</Code>", e.read())

    def test_state_dir_private(self):
        self.assertEqual(0o700, stat.S_IMODE(os.stat(self.service.state_dir).st_mode))
        for name in os.listdir(self.service.state_dir):
            mode = stat.S_IMODE(os.stat(os.path.join(self.service.state_dir, name)).st_mode)
            self.assertEqual(0, mode & 0o077, name)


class TestLegacy(APITestCase):

    def test_import_volume_and_instance(self):
        url = f"{STORE}/{self.account}-uploads/disk.vmdk.manifest.xml?X-Amz-Signature=abc"
        volume = self.ec2.import_volume(AvailabilityZone="us-east-1a", Description="vol",
                                        Image={"Format": "VMDK", "Bytes": 5000, "ImportManifestUrl": url},
                                        Volume={"Size": 1})["ConversionTask"]
        self.assertRegex(volume["ConversionTaskId"], r"^import-vol-[0-9a-f]{8}$")
        self.assertEqual(("active", url), (volume["State"], volume["ImportVolume"]["Image"]["ImportManifestUrl"]))
        self.assertIn("ExpirationTime", volume)
        instance = self.ec2.import_instance(
            Platform="Linux", Description="inst",
            LaunchSpecification={"Architecture": "x86_64", "InstanceType": "m1.small"},
            DiskImages=[{"Image": {"Format": "RAW", "Bytes": 5000, "ImportManifestUrl": url},
                         "Volume": {"Size": 1}}])["ConversionTask"]
        self.assertRegex(instance["ConversionTaskId"], r"^import-i-[0-9a-f]{8}$")
        self.assertEqual("active", instance["ImportInstance"]["Volumes"][0]["Status"])
        found = self.ec2.describe_conversion_tasks()["ConversionTasks"]
        self.assertEqual({volume["ConversionTaskId"], instance["ConversionTaskId"]},
                         {t["ConversionTaskId"] for t in found})
        self.assertError("InvalidParameterValue", self.ec2.import_volume, AvailabilityZone="z",
                         Image={"Format": "VMDK", "Bytes": 5 * 1024 ** 3, "ImportManifestUrl": url},
                         Volume={"Size": 1})

    def test_manifest_url_refused(self):
        for url in ("http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
                    "http://example.com/manifest.xml", "ftp://127.0.0.1/m.xml"):
            e = self.assertError("InvalidParameterValue", self.ec2.import_volume, AvailabilityZone="z",
                                 Image={"Format": "RAW", "Bytes": 1024, "ImportManifestUrl": url},
                                 Volume={"Size": 1})
            self.assertIn("Image.ImportManifestUrl", e.response["Error"]["Message"])
        self.assertEqual([], self.ec2.describe_conversion_tasks()["ConversionTasks"])

    def test_legacy_views(self):
        """A legacy task submitted directly (as the handler does), seen through the API."""
        db = self.db()
        params = {"source": {"manifest_url": "http://store/b/m.xml"}, "format": "vmdk", "bytes": 5000,
                  "volume_size": 1, "availability_zone": "us-east-1a", "platform": "auto"}
        volume = tasks.submit(db, self.account, "import-volume", params, wait_for_upload=True)
        instance = tasks.submit(db, self.account, "import-instance",
                                dict(params, platform="windows", platform_shown="Windows"), wait_for_upload=True)
        found = {t["ConversionTaskId"]: t for t in self.ec2.describe_conversion_tasks()["ConversionTasks"]}
        self.assertEqual({volume.id, instance.id}, set(found))
        v = found[volume.id]
        self.assertEqual(("active", "waiting for the upload", "VMDK", 5000, 1),
                         (v["State"], v["StatusMessage"], v["ImportVolume"]["Image"]["Format"],
                          v["ImportVolume"]["Image"]["Size"], v["ImportVolume"]["Volume"]["Size"]))
        self.assertEqual("Windows", found[instance.id]["ImportInstance"]["Platform"])
        # A failed legacy task is `cancelled` with its reason, so that the waiter stops.
        tasks.mark_uploaded(db, volume.id)
        tasks.claim(db, "w")
        tasks.fail(db, volume.id, "w", "download: part 3 (disk.part.2) is 10 bytes, the manifest says 20")
        self.ec2.get_waiter("conversion_task_cancelled").wait(ConversionTaskIds=[volume.id],
                                                              WaiterConfig={"Delay": 1, "MaxAttempts": 3})
        v = self.ec2.describe_conversion_tasks(ConversionTaskIds=[volume.id])["ConversionTasks"][0]
        self.assertEqual("cancelled", v["State"])
        self.assertIn("disk.part.2", v["StatusMessage"])
        self.ec2.cancel_conversion_task(ConversionTaskId=instance.id, ReasonMessage="no longer needed")
        i = self.ec2.describe_conversion_tasks(ConversionTaskIds=[instance.id])["ConversionTasks"][0]
        self.assertEqual(("cancelled", "no longer needed"), (i["State"], i["StatusMessage"]))
        self.assertError("IncorrectState", self.ec2.cancel_conversion_task, ConversionTaskId=instance.id)


class TestAWSCLI(APITestCase):
    """The AWS CLI (v1, from PyPI) unchanged, with --endpoint-url."""

    def aws(self, *args):
        home = self.useFixture(sf.TempDir()).path
        env = {"PATH": os.environ["PATH"], "HOME": home, "AWS_ACCESS_KEY_ID": self.access,
               "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": sf.REGION,
               "AWS_CONFIG_FILE": os.path.join(home, "none"),
               "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "none")}
        aws = os.path.join(os.path.dirname(sys.executable), "aws")
        result = subprocess.run([aws, "--endpoint-url", self.service.url, "--output", "json", "ec2", *args],
                                capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise AssertionError(f"aws ec2 {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else {}

    def test_import_describe_cancel(self):
        task_id = self.aws("import-image", "--description", "from the cli", "--disk-containers",
                           "Format=VMDK,UserBucket={S3Bucket=images,S3Key=disk.vmdk}")["ImportTaskId"]
        found = self.aws("describe-import-image-tasks", "--import-task-ids", task_id)["ImportImageTasks"]
        self.assertEqual([(task_id, "active", "from the cli")],
                         [(t["ImportTaskId"], t["Status"], t["Description"]) for t in found])
        cancelled = self.aws("cancel-import-task", "--import-task-id", task_id)
        self.assertEqual("deleted", cancelled["State"])

    def test_describe_cancel_conversion_tasks(self):
        # The AWS CLI has no import-volume / import-instance (awscli/customizations/removals.py
        # takes them out); boto3 submits, the CLI follows and cancels.
        url = f"{STORE}/{self.account}-uploads/disk.manifest.xml"
        task = self.ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1}, Image={
            "Format": "RAW", "Bytes": 4096, "ImportManifestUrl": url})["ConversionTask"]
        found = self.aws("describe-conversion-tasks", "--conversion-task-ids", task["ConversionTaskId"])
        self.assertEqual(["active"], [t["State"] for t in found["ConversionTasks"]])
        self.aws("cancel-conversion-task", "--conversion-task-id", task["ConversionTaskId"])
        found = self.aws("describe-conversion-tasks")["ConversionTasks"]
        self.assertEqual(["cancelled"], [t["State"] for t in found])


class TestExport(APITestCase):

    def register_image(self):
        db = self.db()
        task = tasks.submit(db, self.account, "import-image", {"source": {"bucket": "b", "key": "k"}})
        tasks.claim(db, "w")
        return tasks.complete(db, task.id, "w", {}, [
            {"kind": "image", "bucket": "imaging-service", "key": f"{task.id}.raw", "size": 1024 ** 3,
             "format": "raw", "platform": "linux", "architecture": "x86_64"}]).result["image_id"]

    def test_export_own_image_only(self):
        image_id = self.register_image()
        location = {"S3Bucket": f"{self.account}-exports", "S3Prefix": "out/"}
        started = self.ec2.export_image(ImageId=image_id, DiskImageFormat="VMDK", S3ExportLocation=location,
                                        Description="to vmdk")
        task_id = started["ExportImageTaskId"]
        self.assertRegex(task_id, r"^export-ami-[0-9a-f]{17}$")
        self.assertEqual(("active", "VMDK", image_id),
                         (started["Status"], started["DiskImageFormat"], started["ImageId"]))
        found = self.ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"]
        self.assertEqual([(task_id, location)], [(t["ExportImageTaskId"], t["S3ExportLocation"]) for t in found])
        # Another account can neither see nor export it: the image "does not exist".
        access, secret, _ = self.service.credential()
        other = self.service.client(access, secret)
        self.assertError("InvalidAMIID.NotFound", other.export_image, ImageId=image_id, DiskImageFormat="RAW",
                         S3ExportLocation={"S3Bucket": "x"})
        self.assertError("InvalidAMIID.NotFound", other.describe_images, ImageIds=[image_id])
        self.assertEqual([], other.describe_images(Owners=["self"])["Images"])
        self.assertError("InvalidConversionTaskId", other.describe_export_image_tasks, ExportImageTaskIds=[task_id])
        self.assertError("InvalidConversionTaskId", other.cancel_export_task, ExportTaskId=task_id)
        self.ec2.cancel_export_task(ExportTaskId=task_id)
        found = self.ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"]
        self.assertEqual([("deleted", "cancelled by the user")], [(t["Status"], t["StatusMessage"]) for t in found])


class TestEmbedded(testtools.TestCase):
    """`serve` on embedded defaults: the object store and the workers start and stop with
    it, and a key pair made by `credentials create` works on the object store too."""

    def test_one_credential_for_api_and_object_store(self):
        s3_port = sf.free_port()
        service = self.useFixture(sf.Service(engine="embedded", args=["--s3-port", str(s3_port), "--workers", "1"]))
        with urllib.request.urlopen(service.url + "/healthz") as r:
            health = json.load(r)
        self.assertEqual({"ok": True, "toolkit": "ok", "database": "ok", "object_store": "ok", "workers": "ok"},
                         health)
        access, secret, account = service.credential()
        service.client(access, secret).describe_conversion_tasks()
        store = f"http://127.0.0.1:{s3_port}"
        s3 = service.client(access, secret, "s3", endpoint_url=store)
        deadline = time.monotonic() + 30  # the service syncs the store's identities every 5 s
        while True:
            try:
                s3.create_bucket(Bucket=f"{account}-images")
                break
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        s3.put_object(Bucket=f"{account}-images", Key="hello", Body=b"hi")
        self.assertRaises(ClientError, service.client(access, "wrong", "s3", endpoint_url=store).list_objects_v2,
                          Bucket=f"{account}-images")
        weed = service.process.pid
        service.stop()
        self.assertEqual(0, service.process.returncode, service.log())
        self.assertNotIn("weed", subprocess.run(["ps", "-o", "args=", "--ppid", str(weed)], capture_output=True,
                                                text=True, check=False).stdout)


class TestHealth(testtools.TestCase):
    engine = "none"

    def test_missing_element_disables_the_service(self):
        service = self.useFixture(sf.Service(engine=self.engine, healthy=False, args=[
            "--s3-endpoint", STORE, "--elements-linux", "mounters no-such-check convert-qemu"]))
        e = self.assertRaises(urllib.error.HTTPError, urllib.request.urlopen, service.url + "/healthz")
        self.assertEqual(503, e.code)
        health = json.load(e)
        self.assertFalse(health["ok"])
        self.assertIn("no-such-check", health["toolkit"])
        self.assertEqual("ok", health["database"])
        # Disabled for new imports; reading still works.
        access, secret, _ = service.credential()
        ec2 = service.client(access, secret)
        error = self.assertRaises(ClientError, ec2.import_image,
                                  DiskContainers=[{"Format": "RAW", "UserBucket": BUCKET}])
        self.assertEqual("ServiceUnavailable", error.response["Error"]["Code"])
        self.assertIn("no-such-check", error.response["Error"]["Message"])
        self.assertEqual([], ec2.describe_import_image_tasks()["ImportImageTasks"])


class TestAPIProcesses(testtools.TestCase):
    """--api-processes 2: a second process answers on the same port (SO_REUSEPORT); every
    connection is answered, and the second process ends with the first, also when the first
    is killed."""

    def api_children(self, pid):
        children = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid and b"spawn_main" in cmdline:
                children.append(int(entry))
        return children

    def gone(self, pid, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return True
            except OSError:
                return True
            time.sleep(0.1)
        return False

    def test_two_processes(self):
        service = self.useFixture(sf.Service(engine="none", args=["--api-processes", "2"]))
        access, secret, _ = service.credential()
        [child] = self.api_children(service.process.pid)
        # The port is listened on (state 0A) by both; the service answers as soon as the
        # first listens, so the second may still be starting.
        deadline = time.monotonic() + 15
        while True:
            with open(f"/proc/{child}/net/tcp") as f:
                listening = [line for line in f if line.split()[3] == "0A" and
                             line.split()[1].endswith(f":{service.port:04X}")]
            if len(listening) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(2, len(listening), listening)
        for _ in range(20):  # new connections each time: the kernel spreads them
            self.assertEqual([], service.client(access, secret).describe_conversion_tasks()["ConversionTasks"])
        service.stop()
        self.assertTrue(self.gone(child), "the second API process outlived the first")

    def test_second_process_ends_when_the_first_is_killed(self):
        service = self.useFixture(sf.Service(engine="none", args=["--api-processes", "2"]))
        [child] = self.api_children(service.process.pid)
        os.kill(service.process.pid, signal.SIGKILL)  # only the first: the second must notice
        service.process.wait()
        self.assertTrue(self.gone(child), "the second API process outlived the killed first one")


# ---- the same tests on the celery engine ----------------------------------------------------------
# Front-ends with --engine celery (PostgreSQL and RabbitMQ shared by each class, a database and a
# queue per test: tests/service/celery_fixtures.py).  No worker runs, as on "none" above: the tests
# make the tasks' states themselves (a worker would fail their imports of STORE at once).
# TestEmbedded is the embedded engine's own (its store and workers in the service process).

@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestImportImageCelery(CeleryEngine, TestImportImage):
    pass


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestErrorsAndIsolationCelery(CeleryEngine, TestErrorsAndIsolation):

    def test_invalid_action_and_unsigned(self):
        # Not the same on both: a celery front-end's /healthz checks the object store and the
        # broker too, and STORE (never contacted by these tests) does not answer: 503.
        e = self.assertRaises(urllib.error.HTTPError, urllib.request.urlopen, self.service.url + "/healthz")
        with e:
            health = json.load(e)
        self.assertEqual((503, "ok", "ok", "ok"), (e.code, health["toolkit"], health["database"], health["broker"]))
        self.assertNotEqual("ok", health["object_store"])  # no credentials, nothing listening
        self.assertError("InvalidAction", self.ec2.describe_instances)
        request = urllib.request.Request(self.service.url + "/", data=b"Action=DescribeConversionTasks")
        e = self.assertRaises(urllib.error.HTTPError, urllib.request.urlopen, request)
        with e:
            self.assertEqual(401, e.code)
            self.assertIn(b"<Code>AuthFailure</Code>", e.read())


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestLegacyCelery(CeleryEngine, TestLegacy):
    pass


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestAWSCLICelery(CeleryEngine, TestAWSCLI):
    pass


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestExportCelery(CeleryEngine, TestExport):
    pass


@testtools.skipIf(WHY_NOT, WHY_NOT)
class TestHealthCelery(CeleryEngine, TestHealth):
    pass
