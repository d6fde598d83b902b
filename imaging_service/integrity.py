"""Per-part integrity of an object that `imaging import` uploaded: the worker's side.

The command uploads in parts, each with its SHA-256 (x-amz-checksum-sha256), which the
store checks as the part arrives; the store keeps the object's composite checksum
(base64 SHA-256 of the parts' digests, "-N" for N parts).  A worker that streams the
object recomputes it from the bytes it got, so a part damaged after the upload (on the
store, or on the way to the worker) fails the task naming the part when the store
lists per-part checksums (AWS), or the object otherwise.

At submit the front-end keeps the store's checksums with the task (source["integrity"] =
integrity.record(s3_client, bucket, key), read with the user's keys); the fetch
(imaging_service/fetch.py, for a {"bucket", "key"} source) checks the bytes against that record,
or against what the store says at fetch time when nothing was recorded (the upload came later):

    check = integrity.from_record(name, recorded) or integrity.expected(s3_client, bucket, key)
    ... check.update(chunk) for every chunk streamed, in order ...
    if check: check.verify()                              # raises IntegrityError
"""

import base64
import hashlib

import botocore.exceptions


class IntegrityError(Exception):
    """The bytes are not the ones uploaded; the message names the part or the object."""


class CompositeSHA256:
    def __init__(self, name, checksum, part_sizes, part_checksums=None):
        digest, _, count = checksum.partition("-")
        if count and int(count) != len(part_sizes):
            raise IntegrityError(f"{name}: the checksum says {count} parts but the store lists {len(part_sizes)}")
        self.name, self.want = name, digest
        self.composite = bool(count)
        self.sizes, self.part_checksums = list(part_sizes), list(part_checksums or [])
        self.digests = []
        self._part = hashlib.sha256()
        self._left = self.sizes[0] if self.sizes else 0
        self._whole = hashlib.sha256()

    def update(self, data):
        self._whole.update(data)
        view = memoryview(data)
        while view:
            if not self._left:
                self._next_part()
                if not self.sizes[len(self.digests):]:
                    raise IntegrityError(f"{self.name} has more bytes than its parts")
            n = min(self._left, len(view))
            self._part.update(view[:n])
            self._left -= n
            view = view[n:]

    def _next_part(self):
        index = len(self.digests)
        digest = self._part.digest()
        if index < len(self.part_checksums) and self.part_checksums[index] and \
                base64.b64encode(digest).decode() != self.part_checksums[index]:
            raise IntegrityError(f"{self.name}: part {index + 1} is corrupt: its SHA-256 is not the one "
                                 "checked when it was uploaded")
        self.digests.append(digest)
        self._part = hashlib.sha256()
        self._left = self.sizes[index + 1] if index + 1 < len(self.sizes) else 0

    def verify(self):
        if not self.composite:
            got = base64.b64encode(self._whole.digest()).decode()
        else:
            if len(self.digests) < len(self.sizes):
                if self._left:
                    raise IntegrityError(f"{self.name} is truncated in part {len(self.digests) + 1}")
                self._next_part()
            got = base64.b64encode(hashlib.sha256(b"".join(self.digests)).digest()).decode()
        if got != self.want:
            raise IntegrityError(f"{self.name} is corrupt: its SHA-256 checksum is not the one the store "
                                 "checked at upload (a part was damaged since)")


def record(s3, bucket, key):
    """What the store says now of s3://bucket/key's SHA-256 (a boto3 S3 client), as JSON-able data
    kept with the task at submit: {"checksum", "part_sizes", "part_checksums"}, or None when the
    object has no SHA-256 (or is not there yet).  Kept at submit because an object replaced later
    gets the new bytes' checksum (or none) from the store."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except botocore.exceptions.ClientError:
        return None
    checksum = head.get("ChecksumSHA256")
    if not checksum:
        return None
    if "-" not in checksum:
        return {"checksum": checksum, "part_sizes": [head["ContentLength"]], "part_checksums": []}
    attrs = s3.get_object_attributes(Bucket=bucket, Key=key, ObjectAttributes=["ObjectParts"], MaxParts=10000)
    parts = sorted((attrs.get("ObjectParts") or {}).get("Parts") or [], key=lambda p: p["PartNumber"])
    return {"checksum": checksum, "part_sizes": [p["Size"] for p in parts],
            "part_checksums": [p.get("ChecksumSHA256") for p in parts]}


def from_record(name, recorded):
    """The check of a record() result, or None when there is nothing to check."""
    if not recorded:
        return None
    return CompositeSHA256(name, recorded["checksum"], recorded["part_sizes"], recorded["part_checksums"])


def expected(s3, bucket, key):
    """The check for s3://bucket/key (a boto3 S3 client) as the store says now, or None."""
    return from_record(f"s3://{bucket}/{key}", record(s3, bucket, key))
