"""SigV4 verification with botocore's own signer.

The request is rebuilt from what arrived (method, path, query, the headers
that the client says it signed, the body) and signed again with the stored
secret at the request's own timestamp by botocore.auth.SigV4Auth (the
Authorization header) or SigV4QueryAuth (a presigned URL: X-Amz-Algorithm,
X-Amz-Credential, X-Amz-Date, X-Amz-Expires, X-Amz-SignedHeaders and
X-Amz-Signature in the query string); the two signatures are compared in
constant time.  No canonicalisation of our own: only the derived signing key
is kept (per secret, day, region and service), so that the four HMACs that
make it are not repeated for every request of a caller.
"""

import datetime
import functools
import hashlib
import hmac
import re
import urllib.parse

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from imaging_service.errors import EC2Error

MAX_SKEW = datetime.timedelta(minutes=15)
MAX_EXPIRES = 7 * 24 * 3600  # AWS's longest presigned URL: a week
SERVICE = "ec2"
ALGORITHM = "AWS4-HMAC-SHA256"
# The query parameters of a presigned request: they are not the operation's parameters.
QUERY_AUTH = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
              "X-Amz-Signature")
_FIELD = re.compile(r"(\w+)=([^,\s]*)")
_STAMP = re.compile(r"^\d{8}T\d{6}Z\Z")


def _incomplete(why):
    return EC2Error("IncompleteSignature", why)


@functools.lru_cache(maxsize=4096)
def _signing_key(secret, day, region, service):
    """kSigning of SigV4, derived as botocore's SigV4Auth.signature derives it."""
    sign = SigV4Auth._sign
    key = sign(None, f"AWS4{secret}".encode(), day)
    for part in (region, service, "aws4_request"):
        key = sign(None, key, part)
    return key


class _CachedKey:
    """botocore's signer with the derived key kept: the string to sign is botocore's."""

    def signature(self, string_to_sign, request):
        key = _signing_key(self.credentials.secret_key, request.context["timestamp"][:8], self._region_name,
                           self._service_name)
        return self._sign(key, string_to_sign, hex=True)


class HeaderSigner(_CachedKey, SigV4Auth):
    pass


class QuerySigner(_CachedKey, SigV4QueryAuth):
    pass


def parse_authorization(value):
    """'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...' -> its parts."""
    algorithm, _, rest = (value or "").strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _incomplete(f"Unsupported signature algorithm {algorithm!r}: only AWS4-HMAC-SHA256 (SigV4)")
    fields = dict(_FIELD.findall(rest))
    for name in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(name):
            raise _incomplete(f"Authorization header requires '{name}' parameter.")
    return _scope(fields["Credential"]), fields["SignedHeaders"].lower().split(";"), fields["Signature"]


def _scope(credential):
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise _incomplete(f"Credential {credential!r} is not ACCESSKEY/DATE/REGION/SERVICE/aws4_request")
    return scope


def _timestamp(amz_date):
    """X-Amz-Date as a UTC datetime (by hand: strptime is a tenth of a request's check)."""
    if not _STAMP.match(amz_date or ""):
        raise _incomplete(f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ")
    d = amz_date
    try:
        return datetime.datetime(int(d[0:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]), int(d[11:13]),
                                 int(d[13:15]), tzinfo=datetime.UTC)
    except ValueError:
        raise _incomplete(f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None


def _query_auth(url):
    """(the query's auth parameters {name: value}, the URL without X-Amz-Signature) of a
    presigned URL, or (None, url) when the query carries no signature."""
    base, _, query = url.partition("?")
    if "X-Amz-" not in query:
        return None, url
    found, kept = {}, []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        name = urllib.parse.unquote_plus(name)
        if name in QUERY_AUTH:
            if name in found:
                raise _incomplete(f"The query parameter {name} is given twice.")
            found[name] = urllib.parse.unquote_plus(value)
        if name != "X-Amz-Signature":
            kept.append(pair)
    if "X-Amz-Signature" not in found and "X-Amz-Algorithm" not in found:
        return None, url
    return found, base + ("?" + "&".join(kept) if kept else "")


def verify(method, url, headers, body, lookup, region, now=None):
    """Check a request's SigV4 signature (Authorization header or presigned query).

    url: scheme://host/path?query as it arrived; headers: [(name, value)];
    lookup(access_key) -> (secret, account) or None.  Returns (access_key,
    account), or raises EC2Error (AuthFailure, IncompleteSignature,
    SignatureDoesNotMatch, RequestExpired).
    """
    received = {}
    for name, value in headers:
        received.setdefault(name.lower(), []).append(value)
    query_auth, unsigned_url = _query_auth(url)
    if query_auth is not None:
        if "authorization" in received:
            raise _incomplete("Only one auth mechanism allowed: the Authorization header or the X-Amz-* "
                              "query parameters, not both.")
        for name in QUERY_AUTH:
            if not query_auth.get(name):
                raise _incomplete(f"AWS query-string parameters must include '{name}'.")
        if query_auth["X-Amz-Algorithm"] != ALGORITHM:
            raise _incomplete(f"Unsupported X-Amz-Algorithm {query_auth['X-Amz-Algorithm']!r}: only "
                              f"{ALGORITHM} (SigV4)")
        scope = _scope(query_auth["X-Amz-Credential"])
        signed = query_auth["X-Amz-SignedHeaders"].lower().split(";")
        signature, amz_date = query_auth["X-Amz-Signature"], query_auth["X-Amz-Date"]
        try:
            expires = int(query_auth["X-Amz-Expires"])
        except ValueError:
            expires = -1
        if not 1 <= expires <= MAX_EXPIRES:
            raise _incomplete(f"X-Amz-Expires must be a number of seconds from 1 to {MAX_EXPIRES}, "
                              f"not {query_auth['X-Amz-Expires']!r}.")
        if "host" not in signed or "host" not in received:
            raise _incomplete("The header host must be present and signed.")
    elif "authorization" in received:
        scope, signed, signature = parse_authorization(received["authorization"][0])
        for needed in ("host", "x-amz-date"):
            if needed not in signed or needed not in received:
                raise _incomplete(f"The header {needed} must be present and signed.")
        amz_date, expires = received["x-amz-date"][0], None
    else:
        raise EC2Error("AuthFailure", "The request is not signed: AWS Signature Version 4 is required.")
    access_key, day, scope_region, service, _ = scope
    missing = [h for h in signed if h not in received]
    if missing:
        raise _incomplete(f"Signed headers are missing from the request: {', '.join(missing)}")
    when = _timestamp(amz_date)
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

    request = AWSRequest(method=method, url=unsigned_url, data=body,
                         headers={h: ",".join(received[h]) for h in signed})
    request.context["timestamp"] = amz_date
    signer = (QuerySigner if query_auth is not None else HeaderSigner)(Credentials(access_key, secret), SERVICE,
                                                                         region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise EC2Error("SignatureDoesNotMatch",
                       "The request signature we calculated does not match the signature you provided. "
                       "Check your AWS Secret Access Key and signing method.")
    now = now or datetime.datetime.now(datetime.UTC)
    if expires is not None:  # presigned: valid from X-Amz-Date (less the skew) for X-Amz-Expires
        if now > when + datetime.timedelta(seconds=expires) or when - now > MAX_SKEW:
            raise EC2Error("RequestExpired", f"Request has expired: the presigned URL of {amz_date} was valid "
                                             f"for {expires} seconds; the server's time is "
                                             f"{now.strftime(SIGV4_TIMESTAMP)}.")
    elif abs(now - when) > MAX_SKEW:
        raise EC2Error("RequestExpired", f"Request has expired: X-Amz-Date {amz_date} is more than "
                                         f"{int(MAX_SKEW.total_seconds() // 60)} minutes from the server's "
                                         f"time {now.strftime(SIGV4_TIMESTAMP)}.")
    return access_key, account
