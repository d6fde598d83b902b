"""SigV4 verification with botocore's own signer.

The request is rebuilt from what arrived (method, path, query, the headers
that the client says it signed, the body) and signed again with the stored
secret at the request's own timestamp by botocore.auth.SigV4Auth; the two
signatures are compared in constant time.  No canonicalisation of our own.
"""

import datetime
import hashlib
import hmac
import re

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from imaging_service.errors import EC2Error

MAX_SKEW = datetime.timedelta(minutes=15)
SERVICE = "ec2"
_FIELD = re.compile(r"(\w+)=([^,\s]*)")


def _incomplete(why):
    return EC2Error("IncompleteSignature", why)


def parse_authorization(value):
    """'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...' -> its parts."""
    algorithm, _, rest = (value or "").strip().partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        raise _incomplete(f"Unsupported signature algorithm {algorithm!r}: only AWS4-HMAC-SHA256 (SigV4)")
    fields = dict(_FIELD.findall(rest))
    for name in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(name):
            raise _incomplete(f"Authorization header requires '{name}' parameter.")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise _incomplete(f"Credential {fields['Credential']!r} is not ACCESSKEY/DATE/REGION/SERVICE/aws4_request")
    signed = fields["SignedHeaders"].lower().split(";")
    return scope, signed, fields["Signature"]


def verify(method, url, headers, body, lookup, region, now=None):
    """Check a request's SigV4 signature.

    url: scheme://host/path?query as it arrived; headers: [(name, value)];
    lookup(access_key) -> (secret, account) or None.  Returns (access_key,
    account), or raises EC2Error (AuthFailure, IncompleteSignature,
    SignatureDoesNotMatch, RequestExpired).
    """
    received = {}
    for name, value in headers:
        received.setdefault(name.lower(), []).append(value)
    if "authorization" not in received:
        raise EC2Error("AuthFailure", "The request is not signed: AWS Signature Version 4 is required.")
    (access_key, day, scope_region, service, _), signed, signature = parse_authorization(
        received["authorization"][0])
    for needed in ("host", "x-amz-date"):
        if needed not in signed or needed not in received:
            raise _incomplete(f"The header {needed} must be present and signed.")
    missing = [h for h in signed if h not in received]
    if missing:
        raise _incomplete(f"Signed headers are missing from the request: {', '.join(missing)}")
    amz_date = received["x-amz-date"][0]
    try:
        when = datetime.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise _incomplete(f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None
    if day != amz_date[:8]:
        raise EC2Error("SignatureDoesNotMatch", f"The credential date {day} is not the day of X-Amz-Date {amz_date}")
    if service != SERVICE or scope_region != region:
        raise EC2Error("AuthFailure", f"Credential should be scoped to region {region!r} and service "
                                      f"{SERVICE!r}, not {scope_region!r} and {service!r}.")
    found = lookup(access_key)
    if found is None:
        raise EC2Error("AuthFailure", "AWS was not able to validate the provided access credentials")
    secret, account = found
    content_sha = received.get("x-amz-content-sha256", [None])[0]
    if content_sha is not None and content_sha != hashlib.sha256(body).hexdigest():
        # UNSIGNED-PAYLOAD would let anyone on the path change the body.
        raise EC2Error("SignatureDoesNotMatch", "X-Amz-Content-SHA256 does not match the body")

    request = AWSRequest(method=method, url=url, data=body,
                         headers={h: ",".join(received[h]) for h in signed})
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret), SERVICE, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise EC2Error("SignatureDoesNotMatch",
                       "The request signature we calculated does not match the signature you provided. "
                       "Check your AWS Secret Access Key and signing method.")
    now = now or datetime.datetime.now(datetime.UTC)
    if abs(now - when) > MAX_SKEW:
        raise EC2Error("RequestExpired", f"Request has expired: X-Amz-Date {amz_date} is more than "
                                         f"{int(MAX_SKEW.total_seconds() // 60)} minutes from the server's "
                                         f"time {now.strftime(SIGV4_TIMESTAMP)}.")
    return access_key, account
