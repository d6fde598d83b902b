"""SigV4 verification: requests signed by botocore's SigV4Auth (as boto3 signs them)
pass; a wrong secret, an altered body, an unknown key, a stale clock, a malformed
header each get their EC2 error."""

import datetime
import os
import stat
import urllib.error
import urllib.parse
import urllib.request

import botocore.exceptions
import testtools
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from imaging_service import auth
from imaging_service.credentials import CredentialError, Credentials
from imaging_service.db import Database
from imaging_service.errors import EC2Error
from tests.service import fixtures as service_fixtures

URL = "http://127.0.0.1:8773/"
BODY = urllib.parse.urlencode({"Action": "DescribeConversionTasks", "Version": "2016-11-15"}).encode()


def signed(access, secret, when=None, body=BODY, region="us-east-1"):
    """A request signed by botocore at `when` (default now): (headers list, body)."""
    request = AWSRequest(method="POST", url=URL, data=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    signer = SigV4Auth(BotoCredentials(access, secret), "ec2", region)
    when = when or datetime.datetime.now(datetime.UTC)
    request.context["timestamp"] = when.strftime(SIGV4_TIMESTAMP)
    signer._modify_request_before_signing(request)
    signature = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    signer._inject_signature_to_request(request, signature)
    headers = list(request.headers.items()) + [("Host", "127.0.0.1:8773")]
    return headers, body


class TestVerify(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.keys = {"AKIAGOOD": ("s3cr3t", "account-1")}

    def verify(self, headers, body, **kwargs):
        return auth.verify("POST", URL, headers, body, self.keys.get, "us-east-1", **kwargs)

    def assertCode(self, code, headers, body, **kwargs):
        e = self.assertRaises(EC2Error, self.verify, headers, body, **kwargs)
        self.assertEqual(code, e.code, e.message)
        return e

    def test_good_signature(self):
        self.assertEqual(("AKIAGOOD", "account-1"), self.verify(*signed("AKIAGOOD", "s3cr3t")))

    def test_wrong_secret(self):
        e = self.assertCode("SignatureDoesNotMatch", *signed("AKIAGOOD", "guess"))
        self.assertEqual(403, e.status)

    def test_altered_body(self):
        headers, _ = signed("AKIAGOOD", "s3cr3t")
        self.assertCode("SignatureDoesNotMatch", headers, BODY.replace(b"Describe", b"Cancel"))

    def test_unsigned_payload_refused(self):
        headers, body = signed("AKIAGOOD", "s3cr3t")
        headers.append(("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"))
        self.assertCode("SignatureDoesNotMatch", headers, body)

    def test_unknown_key(self):
        e = self.assertCode("AuthFailure", *signed("AKIANOBODY", "s3cr3t"))
        self.assertEqual(401, e.status)

    def test_clock_skew(self):
        now = datetime.datetime.now(datetime.UTC)
        self.verify(*signed("AKIAGOOD", "s3cr3t", when=now - datetime.timedelta(minutes=14)))
        self.assertCode("RequestExpired", *signed("AKIAGOOD", "s3cr3t", when=now - datetime.timedelta(minutes=16)))
        self.assertCode("RequestExpired", *signed("AKIAGOOD", "s3cr3t", when=now + datetime.timedelta(minutes=16)))

    def test_incomplete(self):
        headers, body = signed("AKIAGOOD", "s3cr3t")
        cut = [(n, v.split(", Signature=")[0]) if n == "Authorization" else (n, v) for n, v in headers]
        self.assertCode("IncompleteSignature", cut, body)
        no_date = [(n, v) for n, v in headers if n != "X-Amz-Date"]
        self.assertCode("IncompleteSignature", no_date, body)
        self.assertCode("AuthFailure", [(n, v) for n, v in headers if n != "Authorization"], body)
        v2 = [(n, "AWS AKIAGOOD:abc") if n == "Authorization" else (n, v) for n, v in headers]
        self.assertCode("IncompleteSignature", v2, body)

    def test_query_string_is_signed(self):
        url = URL + "?Action=DescribeConversionTasks&Version=2016-11-15&ConversionTaskId.1=import-vol-0123abcd"
        request = AWSRequest(method="GET", url=url)
        SigV4Auth(BotoCredentials("AKIAGOOD", "s3cr3t"), "ec2", "us-east-1").add_auth(request)
        headers = list(request.headers.items()) + [("Host", "127.0.0.1:8773")]
        self.assertEqual(("AKIAGOOD", "account-1"),
                         auth.verify("GET", url, headers, b"", self.keys.get, "us-east-1"))
        e = self.assertRaises(EC2Error, auth.verify, "GET", url.replace("0123abcd", "0123abce"), headers, b"",
                              self.keys.get, "us-east-1")
        self.assertEqual("SignatureDoesNotMatch", e.code)

    def test_wrong_region(self):
        self.assertCode("AuthFailure", *signed("AKIAGOOD", "s3cr3t", region="eu-west-1"))


class TestCredentials(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = self.useFixture(service_fixtures.TempDir()).path
        self.db = Database(f"sqlite:///{self.tmp}/s.db")
        self.addCleanup(self.db.dispose)
        self.db.upgrade()
        self.key_file = os.path.join(self.tmp, "secret.key")

    def test_secret_encrypted_at_rest(self):
        creds = Credentials(self.db, self.key_file)
        self.assertEqual(0o600, stat.S_IMODE(os.stat(self.key_file).st_mode))
        access, secret, account = creds.create(name="alice")
        with open(os.path.join(self.tmp, "s.db"), "rb") as f:
            raw = f.read()
        for name in ("s.db-wal",):
            if os.path.exists(os.path.join(self.tmp, name)):
                with open(os.path.join(self.tmp, name), "rb") as f:
                    raw += f.read()
        self.assertIn(access.encode(), raw)
        self.assertNotIn(secret.encode(), raw)
        # Another process (a new Credentials) with the same key file reads it back.
        found_secret, found_account = Credentials(self.db, self.key_file).lookup(access)
        self.assertEqual((secret, account), (found_secret, found_account.id))
        self.assertEqual(12, len(account))

    def test_revoke(self):
        creds = Credentials(self.db, self.key_file)
        access, _, account = creds.create()
        second, _, same = creds.create(account_id=account)
        self.assertEqual(account, same)
        creds.revoke(access)
        self.assertIsNone(creds.lookup(access))
        self.assertIsNotNone(creds.lookup(second))
        self.assertEqual([second], [i[0] for i in creds.identities()])
        self.assertRaises(CredentialError, creds.revoke, "AKIANOSUCHKEY")

    def test_key_file_readable_by_others_refused(self):
        Credentials(self.db, self.key_file)
        os.chmod(self.key_file, 0o644)
        e = self.assertRaises(CredentialError, Credentials, self.db, self.key_file)
        self.assertIn(self.key_file, str(e))


def presigned(access, secret, method="GET", when=None, expires=60, url=URL + "?Action=DescribeConversionTasks"
              "&Version=2016-11-15", region="us-east-1"):
    """A URL presigned by botocore's SigV4QueryAuth at `when` (default now)."""
    request = AWSRequest(method=method, url=url, headers={"Host": urllib.parse.urlsplit(url).netloc})
    signer = SigV4QueryAuth(BotoCredentials(access, secret), "ec2", region, expires=expires)
    when = when or datetime.datetime.now(datetime.UTC)
    request.context["timestamp"] = when.strftime(SIGV4_TIMESTAMP)
    signer._modify_request_before_signing(request)
    signature = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    signer._inject_signature_to_request(request, signature)
    return request.url


class TestPresigned(testtools.TestCase):
    """SigV4 in the query string (X-Amz-Algorithm ... X-Amz-Signature), checked by
    botocore's SigV4QueryAuth: expiry enforced, the same error codes as the header."""

    HOST = [("Host", "127.0.0.1:8773")]

    def setUp(self):
        super().setUp()
        self.keys = {"AKIAGOOD": ("s3cr3t", "account-1")}

    def verify(self, url, method="GET", headers=None, **kwargs):
        return auth.verify(method, url, headers or self.HOST, b"", self.keys.get, "us-east-1", **kwargs)

    def assertCode(self, code, url, **kwargs):
        e = self.assertRaises(EC2Error, self.verify, url, **kwargs)
        self.assertEqual(code, e.code, e.message)
        return e

    def test_presigned_get_and_post_pass(self):
        self.assertEqual(("AKIAGOOD", "account-1"), self.verify(presigned("AKIAGOOD", "s3cr3t")))
        post = presigned("AKIAGOOD", "s3cr3t", method="POST")
        self.assertEqual(("AKIAGOOD", "account-1"), self.verify(post, method="POST"))
        # Signed for POST: not valid for GET (the method is signed).
        self.assertCode("SignatureDoesNotMatch", post, method="GET")

    def test_tampered(self):
        url = presigned("AKIAGOOD", "s3cr3t", url=URL + "?Action=DescribeConversionTasks&Version=2016-11-15"
                        "&ConversionTaskId.1=import-vol-0123abcd")
        self.assertCode("SignatureDoesNotMatch", url.replace("0123abcd", "0123abce"))
        self.assertCode("SignatureDoesNotMatch", url + "&Action=CancelConversionTask")
        self.assertCode("SignatureDoesNotMatch", url.replace("X-Amz-Expires=60", "X-Amz-Expires=600"))
        signature = url.rsplit("=", 1)[1]
        self.assertCode("SignatureDoesNotMatch", url.replace(signature, "0" * 64))

    def test_expired(self):
        now = datetime.datetime.now(datetime.UTC)
        two_minutes_ago = now - datetime.timedelta(minutes=2)
        e = self.assertCode("RequestExpired", presigned("AKIAGOOD", "s3cr3t", when=two_minutes_ago, expires=60))
        self.assertEqual(400, e.status)
        self.verify(presigned("AKIAGOOD", "s3cr3t", when=two_minutes_ago, expires=300))
        # Valid until X-Amz-Date + X-Amz-Expires, exactly: the server's clock decides.
        url = presigned("AKIAGOOD", "s3cr3t", when=now, expires=30)
        self.verify(url, now=now + datetime.timedelta(seconds=29))
        self.assertCode("RequestExpired", url, now=now + datetime.timedelta(seconds=31))
        # Not yet valid: dated beyond the allowed clock skew.
        self.assertCode("RequestExpired", presigned("AKIAGOOD", "s3cr3t",
                                                    when=now + datetime.timedelta(minutes=16)))

    def test_wrong_key(self):
        e = self.assertCode("SignatureDoesNotMatch", presigned("AKIAGOOD", "guess"))
        self.assertEqual(403, e.status)
        e = self.assertCode("AuthFailure", presigned("AKIANOBODY", "s3cr3t"))
        self.assertEqual(401, e.status)
        self.assertCode("AuthFailure", presigned("AKIAGOOD", "s3cr3t", region="eu-west-1"))

    def test_incomplete(self):
        url = presigned("AKIAGOOD", "s3cr3t")
        for name in ("X-Amz-Date", "X-Amz-Credential", "X-Amz-SignedHeaders", "X-Amz-Expires", "X-Amz-Algorithm"):
            parts = [p for p in url.split("?", 1)[1].split("&") if not p.startswith(name + "=")]
            self.assertCode("IncompleteSignature", URL + "?" + "&".join(parts))
        self.assertCode("IncompleteSignature", url.replace("X-Amz-Expires=60", "X-Amz-Expires=604801"))
        self.assertCode("IncompleteSignature", url.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"))
        self.assertCode("IncompleteSignature", url + "&X-Amz-Date=20260101T000000Z")
        # Both mechanisms at once.
        headers, _ = signed("AKIAGOOD", "s3cr3t")
        self.assertCode("IncompleteSignature", url, headers=headers)


class TestPresignedService(testtools.TestCase):
    """Through the running service: boto3's presigned URLs work unchanged (POST and GET), an
    expired one is RequestExpired in EC2's error XML, and a key revoked by the `credentials`
    command (another process) fails on the very next call."""

    def test_presigned_and_revocation(self):
        service = self.useFixture(service_fixtures.Service(engine="none"))
        access, secret, _ = service.credential()
        ec2 = service.client(access, secret)

        def call(url, method):
            request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as e:
                with e:
                    return e.code, e.read().decode()

        post = ec2.generate_presigned_url("describe_conversion_tasks", ExpiresIn=60)
        status, body = call(post, "POST")
        self.assertEqual(200, status, body)
        self.assertIn("<DescribeConversionTasksResponse", body)
        get = ec2.generate_presigned_url("describe_import_image_tasks", ExpiresIn=60, HttpMethod="GET")
        status, body = call(get, "GET")
        self.assertEqual(200, status, body)
        self.assertIn("<importImageTaskSet/>", body.replace("<importImageTaskSet></importImageTaskSet>",
                                                            "<importImageTaskSet/>"))
        status, body = call(post.replace("X-Amz-Signature=", "X-Amz-Signature=0"), "POST")
        self.assertEqual((403, True), (status, "<Code>SignatureDoesNotMatch</Code>" in body), body)
        stale = presigned(access, secret, method="GET", expires=1, url=service.url + "/?Action="
                          "DescribeConversionTasks&Version=2016-11-15",
                          when=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5))
        status, body = call(stale, "GET")
        self.assertEqual((400, True), (status, "<Code>RequestExpired</Code>" in body), body)

        # Revocation by the command (another process): the very next call fails.
        self.assertEqual([], ec2.describe_conversion_tasks()["ConversionTasks"])
        service_fixtures.cli("credentials", "revoke", access, *service.common_args())
        e = self.assertRaises(botocore.exceptions.ClientError, ec2.describe_conversion_tasks)
        self.assertEqual("AuthFailure", e.response["Error"]["Code"])
        status, body = call(ec2.generate_presigned_url("describe_conversion_tasks", ExpiresIn=60), "POST")
        self.assertEqual((401, True), (status, "<Code>AuthFailure</Code>" in body), body)
