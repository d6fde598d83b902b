"""SigV4 verification: requests signed by botocore's SigV4Auth (as boto3 signs them)
pass; a wrong secret, an altered body, an unknown key, a stale clock, a malformed
header each get their EC2 error."""

import datetime
import os
import stat
import urllib.parse

import testtools
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
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
