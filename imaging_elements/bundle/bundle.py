"""EC2 AMI bundles (manifest version 2007-10-10), as euca2ools and ec2-ami-tools write them.

The pipeline, and its reverse for unbundling:

    image -> tar stream holding the one file   (SHA-1 of this stream: image/digest)
          -> gzip
          -> AES-128-CBC, PKCS#7 padding, random 128-bit key and IV
          -> parts of 10 MiB, <prefix>.part.NN, each with its SHA-1

The key and the IV, each as its 32-character lowercase hex string, are RSA
PKCS#1 v1.5 encrypted to the cloud's certificate (ec2_*) and to the user's
(user_*).  The manifest is signed with the user's key (RSA PKCS#1 v1.5 over
SHA-1) over the bytes of <machine_configuration>...</machine_configuration>
immediately followed by <image>...</image>, as they stand in the file; a
verifier cuts those bytes out of the file and never re-serialises the XML.

Both directions stream in one pass with bounded memory (a few tens of MiB
whatever the image size) and use the cores: hashlib, isal, AES
(`cryptography`) and the reads and writes release the GIL.  Bundling reads
the image and deflates it in pieces of 3 MiB on a pool of threads (as pigz
does, into one gzip member; a piece whose samples do not compress is written
as stored blocks, a piece of zeros is deflated once), hashes the tar stream
in one thread, encrypts in another and hashes and writes the parts in a
third; unbundling reads, decrypts and inflates in one thread and hashes and
writes the image in another (docs/bundles.md).
Output is written under a temporary name and renamed at the end: a failure
leaves nothing behind.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import queue
import re
import secrets
import shutil
import stat
import struct
import tarfile
import threading
import types
import xml.etree.ElementTree as ET

import defusedxml
import defusedxml.ElementTree
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from isal import igzip_lib, isal_zlib

from imaging_elements import __version__
from imaging_elements.bundle.crypt import BLOCK, CryptError, Decryptor, Encryptor, temp_path

MiB = 1024 * 1024
CHUNK = MiB
PART_SIZE = 10 * MiB
MANIFEST_VERSION = "2007-10-10"
ARCHITECTURES = ("i386", "x86_64", "armhf", "ppc", "ppc64", "ppc64le")
IMAGE_TYPES = ("machine", "kernel", "ramdisk")
KEY_ALGORITHM = "AES-128-CBC"
DIGEST_ALGORITHM = "SHA1"
BUNDLER_NAME = "imaging-elements"
# isal level 2 (its default): compresses filesystem images about as well as
# zlib level 6, at the speed of level 1; unlike level 1 it stores
# incompressible data in stored blocks, which inflate four times faster.
GZIP_LEVEL = 2
# The tar stream is read and deflated in pieces of 3 MiB, each on its own on
# a pool of threads.  The more isal is given at once, the more of the
# incompressible data it writes as stored blocks, which inflate fast; 4 MiB
# pieces left the heap about 20 MB larger (peak RSS 85-89 against 67-70 MiB
# with two threads).  Compressed without the previous piece's dictionary,
# the pieces cost under 0.1 % of size.
DEFLATE_CHUNK = 3 * MiB
# isal's memLevel (zlib's default is 8): its smaller buffers at 6 store
# incompressible data in 3 MiB pieces as it did in one stream fed 8 MiB at a
# time (inflated 1070 MiB/s of CPU against 710 at 8), with the same size and
# speed on binaries (docs/bundles.md).
GZIP_MEM_LEVEL = 6
# Most deflate threads, whatever the cores: AES-CBC encryption is serial and
# keeps up with about two isal threads, so more would only hold more memory.
MAX_DEFLATE_THREADS = 4
# The one gzip member's header: deflate, no name, no time, Unix (RFC 1952).
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
MAX_MANIFEST = 64 * MiB
# Tar headers (pax records, GNU long names, sparse maps) larger than this are
# refused: a hostile bundle must not make us hold an unbounded header.
MAX_TAR_HEADER = 256 * 1024
# Most bytes an unbundled image may have unless the caller says otherwise
# (euca-unbundle --max-size): a bundle of a few MB may inflate to anything.
MAX_IMAGE_SIZE = 1024 ** 4
ZEROS = bytes(CHUNK)
ZERO_PIECE = bytes(DEFLATE_CHUNK)
# The deflate of a piece of zeros, by whether it is the last piece.
_ZERO_PIECES = {}
# A piece is stored (not compressed) when SAMPLES samples of SAMPLE bytes
# spread over it, compressed together at isal level 1, keep STORE_RATIO of
# their size: real images hold much compressed data (packages, media), on
# which isal spends as long as on text to write stored blocks in the end.
# Many small samples judge mixed pieces better than a few large ones (48 MiB
# of /usr/share: 0.4278 of the input against 0.4371 with 4 of 16 KiB).
SAMPLES = 16
SAMPLE = 4096
STORE_RATIO = 0.97
STORED_BLOCK = 65535  # the most a stored block holds


class BundleError(Exception):
    pass


def plain_name(name, what):
    """`name` if it is a plain file name (no directory part); else BundleError."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise BundleError(f"{what} {name!r} is not a plain file name")
    return name


def parse_block_device_mapping(text):
    """{virtual: device} from euca2ools' "VIRTUAL1=DEVICE1,VIRTUAL2=DEVICE2" (-B)."""
    mappings = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        virtual, sep, device = item.partition("=")
        if not sep or not virtual.strip() or not device.strip():
            raise BundleError(f"invalid device mapping {item!r} (must have format VIRTUAL=DEVICE)")
        mappings[virtual.strip()] = device.strip()
    return mappings


def parse_list(text):
    """Product codes from "CODE1,CODE2"."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def resolve_image_type(kernel_id=None, ramdisk_id=None, block_device_mapping=None, image_type="machine"):
    """euca2ools' rule: --kernel true bundles a kernel image, --ramdisk true a ramdisk."""
    if kernel_id == "true":
        image_type = "kernel"
    if ramdisk_id == "true":
        image_type = "ramdisk"
    if image_type != "machine":
        for value, flag in ((kernel_id, "kernel"), (ramdisk_id, "ramdisk")):
            if value and value != "true":
                raise BundleError(f"a {flag} ID is not compatible with image type {image_type!r}")
        if block_device_mapping:
            raise BundleError(f"block device mappings are not compatible with image type {image_type!r}")
    return image_type


# -- keys ---------------------------------------------------------------------

def _read_pem(path, what):
    try:
        with open(path, "rb") as f:
            return f.read(MiB)  # keys and certificates are a few KiB
    except OSError as exc:
        raise BundleError(f"{what} {path}: {exc.strerror}") from None


def load_private_key(path):
    data = _read_pem(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleError(f"private key {path}: the key is protected by a passphrase; "
                          "give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise BundleError(f"private key {path}: not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BundleError(f"private key {path}: not an RSA key")
    return key


def load_certificate_key(path):
    """The RSA public key of the PEM X.509 certificate at `path`."""
    data = _read_pem(path, "certificate")
    try:
        key = x509.load_pem_x509_certificate(data).public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise BundleError(f"certificate {path}: not a PEM X.509 certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BundleError(f"certificate {path}: not an RSA certificate")
    return key


def wrap_secret(public_key, secret):
    """Hex of the RSA PKCS#1 v1.5 encryption of the secret's hex string."""
    return public_key.encrypt(secret.hex().encode(), padding.PKCS1v15()).hex()


def unwrap_secret(private_key, wrapped):
    """The 16-byte secret, or None when `private_key` is not the one it was wrapped to.

    OpenSSL answers a PKCS#1 v1.5 decryption under the wrong key with random
    bytes rather than an error (implicit rejection), so the only test is the
    shape of the result: exactly 32 hex digits.
    """
    try:
        plain = private_key.decrypt(bytes.fromhex(wrapped), padding.PKCS1v15())
    except ValueError:
        return None
    if not re.fullmatch(rb"[0-9a-fA-F]{32}", plain):
        return None
    return bytes.fromhex(plain.decode())


def sign(private_key, data):
    return private_key.sign(data, padding.PKCS1v15(), hashes.SHA1()).hex()


# -- the manifest -------------------------------------------------------------

@dataclasses.dataclass
class Part:
    filename: str
    digest: str  # SHA-1, hex


@dataclasses.dataclass
class Manifest:
    name: str
    user: str
    architecture: str
    image_type: str = "machine"
    kernel_id: str = None
    ramdisk_id: str = None
    block_device_mapping: list = dataclasses.field(default_factory=list)  # [(virtual, device)]
    product_codes: list = dataclasses.field(default_factory=list)
    digest: str = ""  # SHA-1 of the tar stream, hex
    size: int = 0  # of the image
    bundled_size: int = 0  # of the encrypted stream: all the parts
    parts: list = dataclasses.field(default_factory=list)
    ec2_encrypted_key: str = ""
    user_encrypted_key: str = ""
    ec2_encrypted_iv: str = ""
    user_encrypted_iv: str = ""
    signature: str = ""
    bundler: tuple = (BUNDLER_NAME, __version__, "0")
    # Parsed manifests: where it came from, and the bytes the signature covers.
    path: str = "manifest"
    signed_bytes: bytes = b""

    # -- writing --
    def _machine_configuration(self):
        mc = ET.Element("machine_configuration")
        _sub(mc, "architecture", self.architecture)
        if self.kernel_id:
            _sub(mc, "kernel_id", self.kernel_id)
        if self.ramdisk_id:
            _sub(mc, "ramdisk_id", self.ramdisk_id)
        if self.block_device_mapping:
            mappings = _sub(mc, "block_device_mapping")
            for virtual, device in self.block_device_mapping:
                mapping = _sub(mappings, "mapping")
                _sub(mapping, "virtual", virtual)
                _sub(mapping, "device", device)
        if self.product_codes:
            codes = _sub(mc, "product_codes")
            for code in self.product_codes:
                _sub(codes, "product_code", code)
        return mc

    def _image(self):
        image = ET.Element("image")
        _sub(image, "name", self.name)
        _sub(image, "user", self.user)
        _sub(image, "type", self.image_type)
        _sub(image, "digest", self.digest, algorithm=DIGEST_ALGORITHM)
        _sub(image, "size", self.size)
        _sub(image, "bundled_size", self.bundled_size)
        _sub(image, "ec2_encrypted_key", self.ec2_encrypted_key, algorithm=KEY_ALGORITHM)
        _sub(image, "user_encrypted_key", self.user_encrypted_key, algorithm=KEY_ALGORITHM)
        _sub(image, "ec2_encrypted_iv", self.ec2_encrypted_iv)
        _sub(image, "user_encrypted_iv", self.user_encrypted_iv)
        parts = _sub(image, "parts", count=str(len(self.parts)))
        for index, part in enumerate(self.parts):
            element = _sub(parts, "part", index=str(index))
            _sub(element, "filename", part.filename)
            _sub(element, "digest", part.digest, algorithm=DIGEST_ALGORITHM)
        return image

    def seal(self, key, iv, private_key, user_key, ec2_key):
        """Wrap the key and IV to both certificates, sign; returns the manifest's bytes."""
        self.ec2_encrypted_key = wrap_secret(ec2_key, key)
        self.user_encrypted_key = wrap_secret(user_key, key)
        self.ec2_encrypted_iv = wrap_secret(ec2_key, iv)
        self.user_encrypted_iv = wrap_secret(user_key, iv)
        self.signed_bytes = _xml(self._machine_configuration()) + _xml(self._image())
        self.signature = sign(private_key, self.signed_bytes)
        version = ET.Element("version")
        version.text = MANIFEST_VERSION
        bundler = ET.Element("bundler")
        for tag, value in zip(("name", "version", "release"), self.bundler):
            _sub(bundler, tag, value)
        # Assembled from the very bytes that were signed.
        return (b"<?xml version='1.0' encoding='ASCII'?>\n<manifest>" + _xml(version)
                + _xml(bundler) + self.signed_bytes
                + b"<signature>" + self.signature.encode() + b"</signature></manifest>")

    # -- reading --
    @classmethod
    def parse(cls, data, path="manifest"):
        """A Manifest from the bytes of a manifest file; BundleError names `path` and the fault."""
        where = f"manifest {path}"
        try:
            # No DTD, so no entity expansion and no external fetches.
            root = defusedxml.ElementTree.fromstring(data, forbid_dtd=True)
        except (ET.ParseError, defusedxml.DefusedXmlException) as exc:
            raise BundleError(f"{where}: not a valid manifest: {exc}") from None
        if root.tag != "manifest":
            raise BundleError(f"{where}: the root element is <{root.tag}>, not <manifest>")
        version = (root.findtext("version") or "").strip()
        if version != MANIFEST_VERSION:
            raise BundleError(f"{where}: manifest version {version!r} is not supported "
                              f"(only {MANIFEST_VERSION})")
        # The values come from the signed bytes themselves, so what is
        # verified is exactly what is used.
        mc_bytes, image_bytes = _cut(data, "machine_configuration", where), _cut(data, "image", where)
        mc = defusedxml.ElementTree.fromstring(mc_bytes, forbid_dtd=True)
        image = defusedxml.ElementTree.fromstring(image_bytes, forbid_dtd=True)

        def text(element, tag, required=True):
            value = element.findtext(tag)
            if value is None or not value.strip():
                if required:
                    raise BundleError(f"{where}: <{element.tag}> has no <{tag}>")
                return None
            return value.strip()

        def number(element, tag):
            value = text(element, tag)
            if not value.isdigit():
                raise BundleError(f"{where}: <{tag}> is {value!r}, not a byte count")
            return int(value)

        def hexfield(element, tag, length=None):
            value = text(element, tag).lower()
            if not re.fullmatch(r"[0-9a-f]+", value) or (length and len(value) != length):
                raise BundleError(f"{where}: <{tag}> is not a hex string"
                                  + (f" of {length} digits" if length else ""))
            return value

        def algorithm(element, tag, expected):
            found = element.find(tag).get("algorithm", expected)
            if found.upper() != expected:
                raise BundleError(f"{where}: <{tag}> algorithm {found!r} is not supported "
                                  f"(only {expected})")

        bundler = root.find("bundler")
        manifest = cls(
            name=plain_name(text(image, "name"), f"{where}: image name"),
            user=text(image, "user"),
            architecture=text(mc, "architecture"),
            image_type=text(image, "type", required=False) or "machine",
            kernel_id=text(mc, "kernel_id", required=False),
            ramdisk_id=text(mc, "ramdisk_id", required=False),
            block_device_mapping=[(text(m, "virtual"), text(m, "device"))
                                  for m in mc.findall("block_device_mapping/mapping")],
            product_codes=[(c.text or "").strip() for c in mc.findall("product_codes/product_code")],
            digest=hexfield(image, "digest", 40),
            size=number(image, "size"),
            bundled_size=number(image, "bundled_size"),
            ec2_encrypted_key=hexfield(image, "ec2_encrypted_key"),
            user_encrypted_key=hexfield(image, "user_encrypted_key"),
            ec2_encrypted_iv=hexfield(image, "ec2_encrypted_iv"),
            user_encrypted_iv=hexfield(image, "user_encrypted_iv"),
            signature=(root.findtext("signature") or "").strip().lower(),
            bundler=tuple((bundler.findtext(t) or "") if bundler is not None else ""
                          for t in ("name", "version", "release")),
            path=path,
            signed_bytes=mc_bytes + image_bytes,
        )
        algorithm(image, "digest", DIGEST_ALGORITHM)
        for tag in ("ec2_encrypted_key", "user_encrypted_key"):
            algorithm(image, tag, KEY_ALGORITHM)
        manifest.parts = _parse_parts(image, where)
        return manifest

    def secret(self, private_key, key_path):
        """(key, iv): unwrapped with the user's copy, else the cloud's."""
        for owner in ("user", "ec2"):
            key = unwrap_secret(private_key, getattr(self, f"{owner}_encrypted_key"))
            iv = unwrap_secret(private_key, getattr(self, f"{owner}_encrypted_iv"))
            if key is not None and iv is not None:
                return key, iv
        raise BundleError(f"private key {key_path} cannot decrypt the bundle's key: it is the key "
                          f"of neither the user's nor the cloud's certificate that {self.path} "
                          "was bundled for")

    def verify(self, public_key, cert_path):
        try:
            public_key.verify(bytes.fromhex(self.signature), self.signed_bytes,
                              padding.PKCS1v15(), hashes.SHA1())
        except (InvalidSignature, ValueError):
            raise BundleError(f"manifest {self.path}: the signature does not verify with "
                              f"{cert_path}: the manifest was altered or signed by another key") from None


def _sub(parent, tag, text=None, **attrib):
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = str(text)
    return element


def _xml(element):
    return ET.tostring(element, encoding="unicode").encode("ascii", "xmlcharrefreplace")


def _cut(data, tag, where):
    """The bytes of the one <tag>...</tag> element, as they stand in the file."""
    start, end = f"<{tag}>".encode(), f"</{tag}>".encode()
    if data.count(start) != 1 or data.count(end) != 1:
        raise BundleError(f"{where}: expected exactly one <{tag}> element")
    first = data.index(start)
    last = data.index(end) + len(end)
    if last <= first:
        raise BundleError(f"{where}: <{tag}> is malformed")
    return data[first:last]


def _parse_parts(image, where):
    element = image.find("parts")
    if element is None:
        raise BundleError(f"{where}: <image> has no <parts>")
    count = element.get("count", "")
    entries = element.findall("part")
    if not count.isdigit() or int(count) != len(entries) or not entries:
        raise BundleError(f"{where}: <parts count={count!r}> but {len(entries)} <part> elements")
    parts = [None] * len(entries)
    for entry in entries:
        index = entry.get("index", "")
        if not index.isdigit() or int(index) >= len(parts) or parts[int(index)] is not None:
            raise BundleError(f"{where}: bad or repeated part index {index!r}")
        name = (entry.findtext("filename") or "").strip()
        plain_name(name, f"{where}: part file name")
        digest = (entry.findtext("digest") or "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{40}", digest):
            raise BundleError(f"{where}: part {name}: the digest is not a SHA-1")
        if entry.find("digest").get("algorithm", DIGEST_ALGORITHM).upper() != DIGEST_ALGORITHM:
            raise BundleError(f"{where}: part {name}: only SHA1 part digests are supported")
        parts[int(index)] = Part(name, digest)
    return parts


def read_manifest(path):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except OSError as exc:
        raise BundleError(f"manifest {path}: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST:
        raise BundleError(f"manifest {path}: larger than {MAX_MANIFEST} bytes")
    return Manifest.parse(data, path)


# -- two threads --------------------------------------------------------------

_END, _ABORT = object(), object()


class _StageFailed(Exception):
    """The second thread failed; its own error is raised instead."""


class _Aborted(Exception):
    """The first thread failed; the second one stops."""


def _pipeline(produce, consume, depth=8):
    """Run produce(put) in this thread and consume(chunks) in a second one.

    The queue between them holds at most `depth` chunks, which bounds memory.
    An error in either thread stops both; the first thread's own error wins.
    """
    chunks_queue = queue.Queue(depth)
    failure = []
    ended = threading.Event()  # the producer's last item was taken

    def chunks():
        while True:
            item = chunks_queue.get()
            if item is _END or item is _ABORT:
                ended.set()
                if item is _ABORT:
                    raise _Aborted()
                return
            yield item

    def work():
        try:
            consume(chunks())
        except _Aborted:
            return
        except BaseException as exc:
            failure.append(exc)
            # Drain, so that the producer never blocks on a full queue.
            while not ended.is_set():
                item = chunks_queue.get()
                if item is _END or item is _ABORT:
                    ended.set()

    def put(chunk):
        if failure:
            raise _StageFailed()
        chunks_queue.put(chunk)

    thread = threading.Thread(target=work, name="bundle-stage", daemon=True)
    thread.start()
    try:
        produce(put)
    except _StageFailed:
        chunks_queue.put(_END)
        thread.join()
        raise failure[0]
    except BaseException:
        chunks_queue.put(_ABORT)
        thread.join()
        raise
    chunks_queue.put(_END)
    thread.join()
    if failure:
        raise failure[0]


# -- bundling -----------------------------------------------------------------

class _PartWriter:
    """Cuts the encrypted stream into parts, hashing and writing each."""

    def __init__(self, directory, prefix, part_size):
        self.directory, self.prefix, self.part_size = directory, prefix, part_size
        self.parts = []
        self.size = 0
        self._file = None

    def write(self, data):
        self._guard(self._cut, data)

    def finish(self):
        self._guard(self._close)

    def _guard(self, fn, *args):
        """fn(*args); a failed write (disk full, file too large) closes the part and names it."""
        try:
            fn(*args)
        except OSError as exc:
            name = self.parts[-1].filename if self.parts else self.prefix
            if self._file is not None:
                part, self._file = self._file, None
                try:
                    part.close()
                except OSError:
                    pass  # the error already being reported is the one that matters
            raise BundleError(f"part {name} in {os.path.dirname(self.directory)}: "
                              f"{exc.strerror}") from None

    def _cut(self, data):
        view = memoryview(data)
        while view:
            if self._file is None:
                # euca2ools' names: two digits, growing past 99.
                name = f"{self.prefix}.part.{len(self.parts):02d}"
                self._file = open(os.path.join(self.directory, name), "xb")
                self._hash = hashlib.sha1()
                self._left = self.part_size
                self.parts.append(Part(name, ""))
            piece = view[:self._left]
            self._file.write(piece)
            self._hash.update(piece)
            self._left -= len(piece)
            self.size += len(piece)
            view = view[len(piece):]
            if not self._left:
                self._close()

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            self.parts[-1].digest = self._hash.hexdigest()


def _tar_header(name, size, mtime):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    # pax, as euca2ools writes it: a ustar header, plus a pax record for
    # sizes of 8 GiB and more.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_trailer(header_size, size):
    """Zeros after the data: block padding, the end-of-archive blocks, record padding."""
    length = header_size + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    length = -(-length // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    return bytes(length - header_size - size)


def bundle_image(image, destination, *, arch, user, private_key, user_cert, ec2_cert,
                 prefix=None, name=None, image_type="machine", kernel_id=None, ramdisk_id=None,
                 block_device_mapping=(), product_codes=(), part_size=PART_SIZE,
                 key=None, iv=None, progress=None, on_temp=None, threads=None):
    """Bundle the file `image` into the directory `destination` (made if missing).

    private_key, user_cert and ec2_cert are paths to PEM files.  Writes
    `<prefix>.part.NN` and `<prefix>.manifest.xml`; returns (manifest path,
    part paths).  Everything is written into a temporary directory inside
    `destination` and moved into place at the end, manifest last.
    progress(done, total) is called as the image is read; on_temp(path) is
    called with the temporary directory's name before it exists (a hook
    journals it).  threads: how many threads read and deflate the image (default:
    deflate_threads()).
    """
    if arch not in ARCHITECTURES:
        raise BundleError(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    if image_type not in IMAGE_TYPES:
        raise BundleError(f"image type {image_type!r} is not one of {', '.join(IMAGE_TYPES)}")
    user = (user or "").replace("-", "")
    if not user:
        raise BundleError("no account ID (user) given")
    prefix = plain_name(prefix or os.path.basename(image), "bundle prefix")
    name = plain_name(name or os.path.basename(image), "image name")
    if not 0 < part_size:
        raise BundleError(f"part size {part_size} is not positive")
    threads = threads or deflate_threads()
    signing_key = load_private_key(private_key)
    user_key, ec2_key = load_certificate_key(user_cert), load_certificate_key(ec2_cert)
    key = key or secrets.token_bytes(16)
    iv = iv or secrets.token_bytes(16)

    try:
        source = open(image, "rb")
    except OSError as exc:
        raise BundleError(f"image {image}: {exc.strerror}") from None
    with source:
        st = os.fstat(source.fileno())
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise BundleError(f"image {image}: not a regular file or block device")
        size = os.lseek(source.fileno(), 0, os.SEEK_END)
        os.lseek(source.fileno(), 0, os.SEEK_SET)
        if os.path.lexists(destination) and not os.path.isdir(destination):
            raise BundleError(f"destination {destination}: exists and is not a directory")
        made_destination = not os.path.isdir(destination)
        os.makedirs(destination, exist_ok=True)
        work = os.path.join(destination, f".bundle-{secrets.token_hex(4)}")
        if on_temp:
            on_temp(work)
        os.mkdir(work, 0o700)
        published = []
        try:
            header = _tar_header(name, size, int(st.st_mtime))
            writer = _PartWriter(work, prefix, part_size)
            digest = _bundle_stream(source, image, size, header, Encryptor(key, iv), writer,
                                    progress, threads)
            manifest = Manifest(
                name=name, user=user, architecture=arch, image_type=image_type,
                kernel_id=kernel_id, ramdisk_id=ramdisk_id,
                block_device_mapping=sorted(dict(block_device_mapping).items()),
                product_codes=list(product_codes), digest=digest, size=size,
                bundled_size=writer.size, parts=writer.parts)
            manifest_name = f"{prefix}.manifest.xml"
            with open(os.path.join(work, manifest_name), "xb") as f:
                f.write(manifest.seal(key, iv, signing_key, user_key, ec2_key))
            for filename in [part.filename for part in writer.parts] + [manifest_name]:
                target = os.path.join(destination, filename)
                os.replace(os.path.join(work, filename), target)
                published.append(target)
            os.rmdir(work)
        except BaseException:
            for path in published:
                os.unlink(path)
            shutil.rmtree(work, ignore_errors=True)
            if made_destination:
                shutil.rmtree(destination, ignore_errors=True)
            raise
    return published[-1], published[:-1]


def deflate_threads():
    """The default number of deflate threads: the cores this process may run on, at most 4."""
    return max(1, min(MAX_DEFLATE_THREADS, len(os.sched_getaffinity(0))))


def _deflate_piece(data, last, buffers=None):
    """([raw deflate of `data`], CRC-32 of `data`, its length): a piece of the one gzip member.

    All pieces but the last end byte-aligned and without the final-block bit
    (a sync flush, or stored blocks), so that they concatenate into one
    deflate stream that any inflater reads as one (pigz's way).  A piece of
    zeros is deflated once: pieces are independent streams, so equal input
    gives equal output.  A piece whose samples do not shrink is written as
    stored blocks, without running the compressor over it, into a buffer of
    `buffers` (a _Buffers) when given and large enough.
    """
    if data == ZERO_PIECE:  # a memcmp
        cached = _ZERO_PIECES.get(last)
        if cached is None:
            cached = _ZERO_PIECES[last] = _deflate(data, last)
        return cached
    if _incompressible(data):
        out = None
        if buffers is not None and buffers.size >= _stored_size(len(data)):
            out = buffers.take()
        return [_stored_blocks(data, last, out)], isal_zlib.crc32(data), len(data)
    return _deflate(data, last)


def _deflate(data, last):
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -15, GZIP_MEM_LEVEL)  # -15: raw
    flush = isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH
    return [deflate.compress(data), deflate.flush(flush)], isal_zlib.crc32(data), len(data)


def _incompressible(data):
    """True if SAMPLES spread samples of `data` do not shrink at isal level 1."""
    if len(data) < SAMPLES * SAMPLE:
        return False
    view, step = memoryview(data), len(data) // SAMPLES
    # Joined and compressed at once: a third of the cost of one call per sample.
    samples = b"".join(view[start:start + SAMPLE] for start in range(0, SAMPLES * step, step))
    return len(isal_zlib.compress(samples, 1, -15)) >= STORE_RATIO * len(samples)


def _stored_size(length):
    """The bytes of `length` bytes as stored blocks: 5 bytes of header for each block."""
    return length + 5 * max(1, -(-length // STORED_BLOCK))


def _stored_blocks(data, last, out=None):
    """`data` as raw deflate stored blocks (RFC 1951 3.2.4), from a byte boundary; the
    final-block bit on the last block if `last`.  One copy, about 8 GB/s (zlib level 0
    takes 5 times as long, as long as isal level 2 itself), into `out` if given (a
    bytearray at least _stored_size(len(data)) long; a view of it is returned)."""
    view, length = memoryview(data), len(data)
    size = _stored_size(length)
    out = bytearray(size) if out is None else out
    pos = 0
    for start in range(0, max(length, 1), STORED_BLOCK):
        n = min(STORED_BLOCK, length - start)
        # BFINAL and BTYPE 00 in the low bits of a byte (the rest is padding), LEN, NLEN.
        out[pos:pos + 5] = struct.pack("<BHH", last and start + n == length, n, n ^ 0xFFFF)
        out[pos + 5:pos + 5 + n] = view[start:start + n]
        pos += 5 + n
    return out if len(out) == size else memoryview(out)[:size]


class _Buffers:
    """Bytearrays of one size, used again: glibc hands freed blocks of a few MiB
    back to the kernel, and each fresh one costs its page faults again (50,000 a
    GiB bundled, a tenth of the CPU).  Any thread may take and give."""

    def __init__(self, size):
        self.size = size
        self._free = []
        self._ours = {}  # id -> buffer: holds them, so that an id stays theirs

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            buffer = bytearray(self.size)
            self._ours[id(buffer)] = buffer
            return buffer

    def give(self, buffer):
        """Take `buffer` back if it is one of ours (or a view of one); anything else is ignored."""
        if isinstance(buffer, memoryview):
            buffer = buffer.obj
        if id(buffer) in self._ours:
            self._free.append(buffer)


def _bundle_stream(source, image, size, header, encryptor, writer, progress, threads):
    """Returns the tar stream's SHA-1.

    The image is read in 3 MiB pieces, each at its offset, and deflated on a
    pool of `threads` threads; this thread hashes the tar stream in order (a
    SHA-1 is serial, so nothing else is done here); a second thread takes the
    compressed pieces in order, wraps them in one gzip member and encrypts it
    (AES-CBC is serial too); a third hashes and writes the parts.  Bounded
    queues between them bound the pieces in flight, and the buffers are used
    again.
    """
    tar_hash = hashlib.sha1()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bundle-deflate")
    pieces, stored = _Buffers(DEFLATE_CHUNK), _Buffers(_stored_size(DEFLATE_CHUNK))
    ciphertext = _Buffers(CHUNK + BLOCK)
    fd = source.fileno()

    def read_and_encode(data, offset):
        """Fill `data` from the image at `offset`, then deflate it."""
        view, got = memoryview(data), 0
        while got < len(data):
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise BundleError(f"image {image}: ended after {offset + got} of {size} bytes "
                                  "(did it change while being bundled?)")
            got += n
        return _deflate_piece(data, False, stored)

    def produce(put):
        tar_hash.update(header)
        put(pool.submit(_deflate_piece, header, False))
        # The pieces being read and deflated, not yet hashed: a few more
        # than the threads, so that no thread waits for this one.
        reading = collections.deque()
        offsets = iter(range(0, size, DEFLATE_CHUNK))
        done = 0
        while True:
            while len(reading) < threads + 2 and (offset := next(offsets, None)) is not None:
                length = min(DEFLATE_CHUNK, size - offset)
                data = pieces.take() if length == DEFLATE_CHUNK else bytearray(length)
                future = pool.submit(read_and_encode, data, offset)
                put(future)
                reading.append((future, data))
                del data
            if not reading:
                break
            future, data = reading.popleft()
            future.result()  # read (and deflated)
            tar_hash.update(data)
            pieces.give(data)
            done += len(data)
            if progress and (done % (4 * DEFLATE_CHUNK) == 0 or done == size):
                progress(done, size)
            del future, data
        trailer = _tar_trailer(len(header), size)
        tar_hash.update(trailer)
        put(pool.submit(_deflate_piece, trailer, True))

    def consume(futures):
        def encrypt(put):
            def send(data):
                # 1 MiB at a time, into buffers used again: the writing
                # thread reads them while they are still in the cache.
                view = memoryview(data)
                for start in range(0, len(view), CHUNK):
                    out = ciphertext.take()
                    put(memoryview(out)[:encryptor.update_into(view[start:start + CHUNK], out)])

            send(GZIP_HEADER)
            crc = length = 0
            for future in futures:
                compressed, piece_crc, piece_length = future.result()
                crc = isal_zlib.crc32_combine(crc, piece_crc, piece_length)
                length += piece_length
                for data in compressed:
                    send(data)
                    stored.give(data)
                # Not held while waiting for the next piece.
                del future, compressed, data
            send(struct.pack("<II", crc, length & 0xFFFFFFFF))  # gzip trailer: CRC-32, ISIZE
            put(encryptor.finalize())

        def write(chunks):
            for data in chunks:
                writer.write(data)
                ciphertext.give(data)
            writer.finish()

        _pipeline(encrypt, write, depth=4)

    try:
        # Pieces in flight: one per thread and two more, so that no thread
        # waits while the encrypting thread takes the oldest.
        _pipeline(produce, consume, depth=threads + 2)
    finally:
        pool.shutdown(cancel_futures=True)
    return tar_hash.hexdigest()


# -- unbundling ---------------------------------------------------------------

class _Inflater:
    """The gzip stream, inflated in lists of pieces of about CHUNK bytes (zeros inflate a lot)."""

    # isal builds each piece from growing blocks: pieces of 128 KiB keep the
    # heap small (1 MiB pieces cost about 50 MB of RSS) and inflate no slower.
    PIECE = 128 * 1024

    def __init__(self):
        self._inflate = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)

    def feed(self, data):
        """Yields the inflated pieces of `data`, in lists of about CHUNK bytes."""
        batch, size = [], 0
        view = memoryview(data)
        try:
            # Given PIECE bytes at a time: stored blocks (incompressible
            # data) then inflate whole into one piece, and isal need not
            # copy the input it has not used (a fifth less CPU on such data).
            for start in range(0, len(view), self.PIECE):
                if self._inflate.eof:
                    raise BundleError("data follows the end of the gzip stream")
                out = self._inflate.decompress(view[start:start + self.PIECE], self.PIECE)
                while True:
                    if out:
                        batch.append(out)
                        size += len(out)
                        if size >= CHUNK:
                            yield batch
                            batch, size = [], 0
                    if self._inflate.eof:
                        if self._inflate.unused_data:
                            raise BundleError("data follows the end of the gzip stream")
                        break
                    if self._inflate.needs_input:
                        break
                    out = self._inflate.decompress(b"", self.PIECE)
        except igzip_lib.IsalError as exc:
            raise BundleError(f"the gzip stream is corrupt: {exc}") from None
        if batch:
            yield batch

    def finish(self):
        if not self._inflate.eof:
            raise BundleError("the gzip stream is truncated")


class _TarStream:
    """The tar stream, from the batches of inflated pieces; hashed as it is read.

    It is the file object tarfile's header parser reads from (read and tell),
    so that the headers are parsed by tarfile and the data copied without it.
    """

    def __init__(self, batches):
        self._chunks = (piece for batch in batches for piece in batch)
        self._buffer = b""
        self._pos = 0
        self.sha1 = hashlib.sha1()
        self.offset = 0
        self.header_limit = None  # while parsing headers: the offset they must not pass

    def _fill(self):
        """The next inflated piece into the buffer; False at the end."""
        for data in self._chunks:
            if data:
                self._buffer, self._pos = data, 0
                return True
        return False

    def piece(self, limit):
        """Up to `limit` next bytes; b"" at the end.  Whole inflated chunks are not copied."""
        if self._pos >= len(self._buffer) and not self._fill():
            return b""
        if self._pos == 0 and len(self._buffer) <= limit:
            data = self._buffer
        else:
            data = self._buffer[self._pos:self._pos + limit]
        self._pos += len(data)
        self.offset += len(data)
        self.sha1.update(data)
        return data

    def read(self, n):
        if self.header_limit is not None and self.offset + n > self.header_limit:
            raise BundleError(f"the tar headers are larger than {MAX_TAR_HEADER} bytes")
        pieces = []
        while n > 0:
            data = self.piece(n)
            if not data:
                break
            pieces.append(data)
            n -= len(data)
        return b"".join(pieces)

    def tell(self):
        return self.offset


class _Output:
    """Writes the image, leaving holes where the data is zeros (the file reads the same)."""

    GRAIN = 64 * 1024  # zero runs this long inside a written chunk become holes too

    def __init__(self, fd):
        self.fd = fd

    def copy(self, stream, length):
        while length:
            data = stream.piece(min(length, CHUNK))
            if not data:
                raise BundleError(f"the tar stream ends {length} bytes before the end of the image")
            length -= len(data)
            if ZEROS.startswith(data):
                os.lseek(self.fd, len(data), os.SEEK_CUR)
            else:
                self._write(data)

    def _write(self, data):
        start = 0  # of the data not yet written
        for pos in range(0, len(data), self.GRAIN):
            end = min(pos + self.GRAIN, len(data))
            # Checking both ends first keeps the cost near zero for data that is not zeros.
            if data[pos] == 0 and data[end - 1] == 0 and ZEROS.startswith(data[pos:end]):
                self._write_all(memoryview(data)[start:pos])
                os.lseek(self.fd, end - pos, os.SEEK_CUR)
                start = end
        self._write_all(memoryview(data)[start:])

    def _write_all(self, view):
        while view:
            view = view[os.write(self.fd, view):]


def _read_member(stream, out, size):
    """Parse the tar stream's one member and write its data to `out`; returns its size.

    The member must be `size` bytes (the manifest's): checked before any byte
    is written, so that no more than the declared size is ever written."""
    stream.header_limit = MAX_TAR_HEADER
    state = types.SimpleNamespace(fileobj=stream, encoding="utf-8", errors="surrogateescape",
                                  offset=0, pax_headers={})
    try:
        info = tarfile.TarInfo.fromtarfile(state)
    except tarfile.EOFHeaderError:
        raise BundleError("the tar stream holds no file") from None
    except (tarfile.TarError, ValueError, RecursionError) as exc:
        raise BundleError(f"the tar stream is not valid: {exc}") from None
    stream.header_limit = None
    if not info.isreg():
        raise BundleError(f"the tar member {info.name!r} is not a regular file")
    plain_name(info.name, "the tar member")
    if info.size != size:
        raise BundleError(f"the image is {info.size} bytes, the manifest says {size}")
    if info.sparse is None:
        out.copy(stream, info.size)
    else:
        # A GNU sparse member (ec2-ami-tools bundles with tar -S): its data
        # regions are stored one after the other; everything else is a hole.
        end = 0
        for offset, length in info.sparse:
            if offset < end or offset + length > info.size:
                raise BundleError(f"the tar member {info.name!r} has a bad sparse map")
            os.lseek(out.fd, offset, os.SEEK_SET)
            out.copy(stream, length)
            end = offset + length
    os.ftruncate(out.fd, info.size)
    # After the data only zeros may follow: padding and end-of-archive blocks.
    while True:
        data = stream.piece(CHUNK)
        if not data:
            break
        if not ZEROS.startswith(data):
            raise BundleError("the tar stream holds more than the image file")
    return info.size


def _check_parts(manifest, source_dir):
    """Every part exists and is a regular file; their sizes add up to bundled_size."""
    paths, total = [], 0
    for part in manifest.parts:
        path = os.path.join(source_dir, part.filename)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise BundleError(f"part {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"part {path}: not a regular file")
        paths.append(path)
        total += st.st_size
    if total != manifest.bundled_size:
        # Name the part at fault if its digest shows it.
        for path, part in zip(paths, manifest.parts):
            digest = _file_sha1(path)
            if digest != part.digest:
                raise _part_mismatch(path, digest, part.digest)
        raise BundleError(f"manifest {manifest.path}: bundled_size is {manifest.bundled_size} "
                          f"but the parts hold {total} bytes")
    return paths


def _file_sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


def _part_mismatch(path, found, expected):
    return BundleError(f"part {path}: SHA-1 is {found}, the manifest says {expected}: "
                       "the part is corrupt, truncated or was altered")


def unbundle(manifest, output, *, private_key, source_dir=None, signer_cert=None,
             progress=None, on_temp=None, max_size=MAX_IMAGE_SIZE):
    """Rebuild the image of a bundle into the file `output`.

    `manifest` is a Manifest (read_manifest(path)); its parts are read from
    `source_dir` (default: the manifest's directory).  private_key is the
    path of the user's or the cloud's private key; when signer_cert is given,
    the manifest's signature must verify with it.  Every part's SHA-1, the
    tar stream's SHA-1 and the size are checked; on any failure BundleError
    names what failed and nothing is left at `output`.  No image larger than
    max_size bytes is written: a manifest that declares more is refused first,
    and the data may never exceed what the manifest declares.
    """
    if manifest.size > max_size:
        raise BundleError(f"manifest {manifest.path}: the image would be {manifest.size} bytes, "
                          f"over the limit of {max_size} bytes")
    if signer_cert:
        manifest.verify(load_certificate_key(signer_cert), signer_cert)
    key, iv = manifest.secret(load_private_key(private_key), private_key)
    if source_dir is None:
        source_dir = os.path.dirname(os.path.abspath(manifest.path))
    paths = _check_parts(manifest, source_dir)
    try:
        decryptor = Decryptor(key, iv, manifest.bundled_size)
    except CryptError as exc:
        raise BundleError(f"manifest {manifest.path}: {exc}") from None

    tmp = temp_path(output)
    if on_temp:
        on_temp(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    result = {}
    try:
        def produce(put):
            # Parts, their SHA-1, AES and inflate here; the tar stream in the other thread.
            inflater = _Inflater()
            buffer = bytearray(CHUNK)
            done = 0
            for path, part in zip(paths, manifest.parts):
                digest = hashlib.sha1()
                failed = None
                with open(path, "rb") as f:
                    while n := f.readinto(buffer):
                        view = memoryview(buffer)[:n]
                        digest.update(view)
                        done += n
                        if failed:
                            continue  # only finish this part's digest
                        try:
                            for batch in inflater.feed(decryptor.update(view)):
                                put(batch)
                        except (BundleError, CryptError, _StageFailed) as exc:
                            failed = exc
                # A bad part is the clearest explanation of whatever else failed.
                if digest.hexdigest() != part.digest:
                    raise _part_mismatch(path, digest.hexdigest(), part.digest)
                if failed:
                    raise failed
                if progress:
                    progress(done, manifest.bundled_size)
            decryptor.finalize()
            inflater.finish()

        def consume(chunks):
            stream = _TarStream(chunks)
            result["size"] = _read_member(stream, _Output(fd), manifest.size)
            result["digest"] = stream.sha1.hexdigest()

        try:
            _pipeline(produce, consume)
        except CryptError as exc:
            raise BundleError(f"bundle {manifest.path}: {exc}") from None
        if result["digest"] != manifest.digest:
            raise BundleError(f"manifest {manifest.path}: the image's tar stream has SHA-1 "
                              f"{result['digest']}, the manifest says {manifest.digest}")
        if result["size"] != manifest.size:
            raise BundleError(f"manifest {manifest.path}: the image is {result['size']} bytes, "
                              f"the manifest says {manifest.size}")
        os.close(fd)
        fd = None
        os.replace(tmp, output)
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return output
