"""Fetch a task's source into one local file: an S3 object (read with the
requesting user's keys), a URL on the configured object store, or a legacy
import manifest whose parts are reassembled in order.

Streamed, never more than the scratch limit, every size checked against what
was declared, a SHA-256 of the whole image computed on the way (the cache key).
Every failure is a FetchError whose message names the object or the part.
"""

import base64
import dataclasses
import hashlib
import urllib.parse

import botocore.exceptions
import urllib3

from imaging_service import integrity
from imaging_service import manifest as manifests
from imaging_service.objectstore import CHUNK, ObjectStoreError, url_allowed

MAX_REDIRECTS = 5


class FetchError(Exception):
    """The source cannot be fetched; the message says which object or part, and why."""


class Cancelled(Exception):
    pass


@dataclasses.dataclass
class Fetched:
    path: str
    size: int
    sha256: str
    parts: int = 1
    declared_format: str | None = None  # a manifest's file-format


class _Sink:
    """The output file with its running digest, byte count, limit and progress."""

    def __init__(self, path, limit, progress, cancelled, total):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()
        self.done, self.limit, self.total = 0, limit, total
        self.progress, self.cancelled = progress, cancelled

    def write(self, chunk, what):
        if self.limit is not None and self.done + len(chunk) > self.limit:
            raise FetchError(f"{what}: the image is larger than the scratch limit of {self.limit} bytes")
        self.file.write(chunk)
        self.digest.update(chunk)
        self.done += len(chunk)
        if self.progress:
            self.progress(self.done, self.total)
        if self.cancelled and self.cancelled():
            raise Cancelled()

    def close(self):
        self.file.close()


def _http():
    # No retries or redirects of urllib3's own: every hop is checked here.
    return urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=120))


def http_get(url, allowed_endpoints, what, method="GET", pool=None, headers=None):
    """A response (body not yet read) for a URL on an allowed store, following
    only redirects that stay on allowed stores."""
    pool = pool or _http()
    for _ in range(MAX_REDIRECTS + 1):
        ok, reason = url_allowed(url, allowed_endpoints)
        if not ok:
            raise FetchError(f"{what}: {url.split('?')[0]} is refused: {reason}")
        try:
            # HEAD has no body to stream: read it whole, so the connection is clean for the next request.
            response = pool.request(method, url, preload_content=method == "HEAD", redirect=False,
                                    headers=headers)
        except urllib3.exceptions.HTTPError as e:
            raise FetchError(f"{what}: cannot reach {url.split('?')[0]}: {e}") from None
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location", "")
            _done(response)
            url = urllib.parse.urljoin(url, location)
            continue
        if response.status == 404:
            _done(response)
            raise FetchError(f"{what} does not exist (HTTP 404)")
        if response.status == 403:
            _done(response)
            raise FetchError(f"{what}: access denied (HTTP 403: the presigned URL is expired, altered "
                             "or not the owner's)")
        if response.status >= 300:
            _done(response)
            raise FetchError(f"{what}: HTTP {response.status} from the object store")
        return response
    raise FetchError(f"{what}: more than {MAX_REDIRECTS} redirects")


def _done(response):
    """Give a response's connection back to the pool with nothing left unread on it."""
    response.drain_conn()
    response.release_conn()


def _md5_etag(headers):
    """The MD5 an S3 ETag stands for (single-part uploads only), or None."""
    etag = (headers.get("ETag") or "").strip('"')
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()):
        return etag.lower()
    md5 = headers.get("Content-MD5")
    return base64.b64decode(md5).hex() if md5 else None


def _copy_response(response, sink, expected, what):
    """Stream a response into the sink: exactly `expected` bytes, MD5 checked when the store gives one."""
    length = response.headers.get("Content-Length")
    if length is not None and expected is not None and int(length) != expected:
        _done(response)
        raise FetchError(f"{what} is {length} bytes but the manifest says {expected}")
    md5, want = hashlib.md5(usedforsecurity=False), _md5_etag(response.headers)
    got = 0
    try:
        for chunk in response.stream(CHUNK):
            got += len(chunk)
            if expected is not None and got > expected:
                raise FetchError(f"{what} is larger than the {expected} bytes the manifest says")
            md5.update(chunk)
            sink.write(chunk, what)
    except urllib3.exceptions.HTTPError as e:
        raise FetchError(f"{what}: the transfer broke after {got} bytes: {e}") from None
    finally:
        _done(response)
    if expected is not None and got != expected:
        raise FetchError(f"{what} is truncated: {got} of {expected} bytes")
    if want and md5.hexdigest() != want:
        raise FetchError(f"{what} is corrupt: its MD5 {md5.hexdigest()} is not the store's {want}")
    return got


def load_manifest(url, allowed_endpoints):
    """Fetch and parse a manifest, checking every URL in it; ManifestError or FetchError."""
    response = http_get(url, allowed_endpoints, "the import manifest")
    try:
        data = response.read(manifests.MAX_MANIFEST + 1)
    finally:
        response.close()  # not drained: the rest of an oversized manifest is never read
    manifest = manifests.parse(data)
    for where, part_url in manifest.urls():
        ok, reason = url_allowed(part_url, allowed_endpoints)
        if not ok:
            raise FetchError(f"the import manifest's {where} is refused: {reason}")
    return manifest


def upload_state(source, allowed_endpoints, user_store=None):
    """(ready, reason, fatal) of a waiting upload: are all its parts there (HEAD each)?
    fatal: the manifest itself is refused, waiting longer will not help."""
    try:
        if "manifest_url" in source:
            try:
                manifest = load_manifest(source["manifest_url"], allowed_endpoints)
            except manifests.ManifestError as e:
                return False, f"the import manifest is refused: {e}", True
            pool = _http()
            for part in manifest.parts:
                what = f"part {part.index} ({part.key})"
                if part.head_url:
                    response = http_get(part.head_url, allowed_endpoints, what, method="HEAD", pool=pool)
                else:
                    response = http_get(part.get_url, allowed_endpoints, what, pool=pool,
                                        headers={"Range": "bytes=0-0"})
                _done(response)
            return True, "", False
        if "bucket" in source:
            if user_store is None:
                return False, "the access key that submitted the task was revoked", True
            found = user_store.head(source["bucket"], source["key"])
            return found is not None, "" if found else f"s3://{source['bucket']}/{source['key']} is not there yet", \
                False
        return True, "", False
    except (FetchError, ObjectStoreError) as e:
        return False, str(e), "refused" in str(e)


def source_size(source, allowed_endpoints, user_store=None):
    """The size in bytes the source declares, before fetching it."""
    if "bucket" in source:
        what = f"s3://{source['bucket']}/{source['key']}"
        try:
            head = user_store.head(source["bucket"], source["key"])
        except ObjectStoreError as e:
            raise FetchError(str(e)) from None
        if head is None:
            raise FetchError(f"{what} does not exist")
        return head["size"]
    if "url" in source:
        what = source["url"].split("?")[0]
        # A presigned URL is signed for GET only: ask for one byte and read the total.
        response = http_get(source["url"], allowed_endpoints, what, headers={"Range": "bytes=0-0"})
        _done(response)
        total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
        if not total.isdigit():
            total = response.headers.get("Content-Length") if response.status == 200 else None
        if not total:
            raise FetchError(f"{what}: the store gives no size")
        return int(total)
    if "manifest_url" in source:
        try:
            return load_manifest(source["manifest_url"], allowed_endpoints).size
        except manifests.ManifestError as e:
            raise FetchError(f"the import manifest is refused: {e}") from None
    raise FetchError(f"the task has no source to fetch: {sorted(source)}")


def fetch(source, dest, *, allowed_endpoints, user_store=None, limit=None, progress=None, cancelled=None):
    """Fetch `source` ({"bucket","key"} | {"url"} | {"manifest_url"}) into the file `dest`.

    progress(done, total) after every chunk; cancelled() -> True stops with Cancelled.
    """
    declared_format = None
    if "bucket" in source:
        what = f"s3://{source['bucket']}/{source['key']}"
        try:
            head = user_store.head(source["bucket"], source["key"])
            if head is None:
                raise FetchError(f"{what} does not exist")
            _check_limit(head["size"], limit, what)
            # The SHA-256 of each part, checked by the store at upload; recomputed from the bytes we get.
            check = integrity.from_record(what, source.get("integrity")) or \
                integrity.expected(user_store.client, source["bucket"], source["key"])
            size, chunks = user_store.get_stream(source["bucket"], source["key"])
        except ObjectStoreError as e:
            raise FetchError(str(e)) from None
        except botocore.exceptions.ClientError as e:
            raise FetchError(f"{what}: cannot read its checksums: {e}") from None
        sink = _Sink(dest, limit, progress, cancelled, size)
        try:
            for chunk in chunks:
                if check:
                    check.update(chunk)
                sink.write(chunk, what)
            if sink.done != size:
                raise FetchError(f"{what} is truncated: {sink.done} of {size} bytes")
            if check:
                check.verify()
        except integrity.IntegrityError as e:
            raise FetchError(str(e)) from None
        finally:
            sink.close()
        parts = 1
    elif "url" in source:
        what = source["url"].split("?")[0]
        response = http_get(source["url"], allowed_endpoints, what)
        length = response.headers.get("Content-Length")
        if length is not None:
            _check_limit(int(length), limit, what)
        sink = _Sink(dest, limit, progress, cancelled, int(length) if length else None)
        try:
            _copy_response(response, sink, int(length) if length else None, what)
        finally:
            sink.close()
        parts = 1
    elif "manifest_url" in source:
        try:
            manifest = load_manifest(source["manifest_url"], allowed_endpoints)
        except manifests.ManifestError as e:
            raise FetchError(f"the import manifest is refused: {e}") from None
        _check_limit(manifest.size, limit, "the image the manifest describes")
        declared_format = manifest.file_format.lower()
        sink = _Sink(dest, limit, progress, cancelled, manifest.size)
        pool = _http()
        try:
            for part in manifest.parts:
                what = f"part {part.index} ({part.key})"
                _copy_response(http_get(part.get_url, allowed_endpoints, what, pool=pool), sink, part.size, what)
        finally:
            sink.close()
        parts = len(manifest.parts)
    else:
        raise FetchError(f"the task has no source to fetch: {sorted(source)}")
    return Fetched(dest, sink.done, sink.digest.hexdigest(), parts, declared_format)


def _check_limit(size, limit, what):
    if limit is not None and size > limit:
        raise FetchError(f"{what} is {size} bytes, more than the scratch limit of {limit} bytes")
