"""The object store: a thin layer over boto3's S3 client, and the one check of
which URLs the service may fetch from.

Any S3 works (SeaweedFS, Ceph RGW, Swift s3api, MinIO, AWS); the embedded
SeaweedFS is in imaging_service/seaweed.py.  Users' buckets are always read
with the requesting user's own keys (`ObjectStore.for_user`), so the store's
own permissions decide what a task may read.
"""

import collections
import ipaddress
import os
import socket
import threading
import urllib.parse

import boto3
import botocore.config
import botocore.exceptions

from imaging_service.config import Setting

CHUNK = 1024 * 1024

SETTINGS = [
    Setting("s3_endpoint", "str", None,
            "URL of the S3 object store (Ceph RGW, Swift s3api, MinIO, AWS); default: an embedded "
            "SeaweedFS that the service starts under STATE_DIR", metavar="URL"),
    Setting("s3_region", "str", None, "the object store's region; default: --region", metavar="REGION"),
    Setting("s3_access_key", "str", None, "the service's own access key on an external object store "
            "(it writes the results); embedded: made at first start", metavar="KEY"),
    Setting("s3_secret_key", "str", None, "its secret key", metavar="SECRET"),
    Setting("service_bucket", "str", "imaging-service",
            "the bucket the service keeps converted images in (made when missing)", metavar="BUCKET"),
]


class ObjectStoreError(Exception):
    """An object is missing, unreadable or refused; the message says which."""


def _endpoint(url):
    """(scheme, host, port) of an endpoint or URL, host lower case."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _forbidden_address(address):
    """Why an IP address is never fetched from (cloud metadata, link-local), or None."""
    ip = ipaddress.ip_address(address)
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{address} is a link-local, multicast or reserved address (cloud metadata lives there)"
    if ip in ipaddress.ip_network("fd00:ec2::/32"):
        return f"{address} is the EC2 metadata address"
    return None


def url_allowed(url, allowed_endpoints, resolve=True):
    """(True, "") when `url` points at one of the configured object stores,
    else (False, reason).

    Only http(s) to exactly the scheme, host and port of an allowed endpoint
    (or a virtual-hosted bucket under its DNS name); no user info; no address
    that is link-local or the metadata service, whatever a name resolves to.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host, port = _endpoint(url)
    except ValueError as e:
        return False, f"not a valid URL: {e}"
    if scheme not in ("http", "https"):
        return False, f"scheme {parts.scheme or '(none)'!r} is not allowed: only http(s) to the object store"
    if not host:
        return False, "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return False, "user information in a URL is not allowed"
    matched = False
    for endpoint in allowed_endpoints:
        e_scheme, e_host, e_port = _endpoint(endpoint)
        if (scheme, port) != (e_scheme, e_port):
            continue
        if host == e_host:
            matched = True
        else:
            try:
                ipaddress.ip_address(e_host)
            except ValueError:
                matched = matched or host.endswith("." + e_host)  # bucket.s3.example.com
    if not matched:
        return False, f"{scheme}://{host}:{port} is not a configured object store"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    addresses = [str(literal)] if literal else []
    if resolve and not literal:
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port)})
        except OSError as e:
            return False, f"cannot resolve {host}: {e}"
    for address in addresses:
        reason = _forbidden_address(address.split("%")[0])
        if reason:
            return False, reason
    return True, ""


# One boto3 session for every client: a new session parses botocore's endpoint and S3 model
# files again (about 0.1 s of CPU; it was a third of the service's CPU with a client per task
# and per submit).  Sessions are not thread-safe, clients are: clients are made under a lock.
_SESSION = None
_SESSION_LOCK = threading.Lock()
USER_STORES = 256  # user stores kept (their clients), the least recently used dropped


def _client(**kwargs):
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **kwargs)


class ObjectStore:
    """One S3 endpoint and one key pair."""

    def __init__(self, endpoint_url, region, access_key, secret_key, put_file=None):
        """put_file(path, bucket, key, progress): another way to write objects with these keys'
        rights (the embedded store's filer); not passed on to for_user's stores."""
        self.endpoint_url = endpoint_url
        self._put_file = put_file
        self.region = region or "us-east-1"
        self.access_key = access_key
        self._secret_key = secret_key
        self._users = collections.OrderedDict()  # (access, secret) -> ObjectStore
        self._users_lock = threading.Lock()
        # Path-style addressing: works for every S3 and needs no wildcard DNS.  To a store on
        # this machine the body is not hashed into the signature (its CRC32 is still sent and
        # checked): hashing costs 40 % of an upload's time, and no network lies in between.
        local = _endpoint(endpoint_url)[1] in ("127.0.0.1", "localhost", "::1")
        config = botocore.config.Config(signature_version="s3v4",
                                        s3={"addressing_style": "path", "payload_signing_enabled": not local},
                                        retries={"max_attempts": 3, "mode": "standard"},
                                        connect_timeout=10, read_timeout=60)
        self.client = _client(endpoint_url=endpoint_url, region_name=self.region, aws_access_key_id=access_key,
                              aws_secret_access_key=secret_key, config=config)

    def for_user(self, access_key, secret_key):
        """The same store seen with a user's own keys (kept for the next call with them)."""
        key = (access_key, secret_key)
        with self._users_lock:
            found = self._users.get(key)
            if found is not None:
                self._users.move_to_end(key)
                return found
        found = ObjectStore(self.endpoint_url, self.region, access_key, secret_key)
        with self._users_lock:
            self._users[key] = found
            while len(self._users) > USER_STORES:
                self._users.popitem(last=False)
        return found

    def allowed(self, url):
        return url_allowed(url, [self.endpoint_url])

    def _error(self, e, bucket, key):
        code = e.response.get("Error", {}).get("Code", "")
        what = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectStoreError(f"{what} does not exist")
        if code == "NoSuchBucket":
            return ObjectStoreError(f"bucket {bucket} does not exist")
        if code in ("AccessDenied", "403", "Forbidden"):
            return ObjectStoreError(f"{what}: access denied with the requesting user's credentials")
        return ObjectStoreError(f"{what}: {code or e}")

    def head(self, bucket, key):
        """{'size', 'etag'} of an object, or None when it does not exist."""
        try:
            r = self.client.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            error = self._error(e, bucket, key)
            if "does not exist" in str(error):
                return None
            raise error from None
        except botocore.exceptions.BotoCoreError as e:
            raise ObjectStoreError(f"s3://{bucket}/{key}: {e}") from None
        return {"size": r["ContentLength"], "etag": r.get("ETag", "").strip('"')}

    def get_stream(self, bucket, key):
        """(size, iterator of byte chunks) of an object."""
        try:
            r = self.client.get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            raise self._error(e, bucket, key) from None
        except botocore.exceptions.BotoCoreError as e:
            raise ObjectStoreError(f"s3://{bucket}/{key}: {e}") from None
        return r["ContentLength"], r["Body"].iter_chunks(CHUNK)

    def put_file(self, path, bucket, key, progress=None):
        """Upload a file (multipart for large ones); `progress(bytes)` per chunk sent."""
        try:
            if self._put_file:
                self._put_file(path, bucket, key, progress)
            else:
                self.client.upload_file(path, bucket, key, Callback=progress)
        except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError, OSError) as e:
            raise ObjectStoreError(f"cannot store s3://{bucket}/{key}: {e}") from None

    def put_bytes(self, data, bucket, key):
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except botocore.exceptions.ClientError as e:
            raise self._error(e, bucket, key) from None

    def delete(self, bucket, key):
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            raise self._error(e, bucket, key) from None

    def ensure_bucket(self, bucket):
        try:
            self.client.head_bucket(Bucket=bucket)
            return
        except botocore.exceptions.ClientError:
            pass
        try:
            self.client.create_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(e, bucket, None) from None

    def presign(self, method, bucket, key, expires=3600):
        """A presigned URL: method is 'get_object', 'put_object' or 'head_object'."""
        return self.client.generate_presigned_url(method, Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=expires)

    def ping(self):
        """None when the store answers with these keys, else the reason (for /healthz)."""
        try:
            self.client.list_buckets()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            return str(e)
        return None


def disk_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
