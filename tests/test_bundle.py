"""EC2 AMI bundles: euca2ools interop, the plain OpenSSL pipeline, bad input, memory, hooks.

Bundles are checked with independent tools (openssl, gzip, tar) rather than
only with our own reader; hostile bundles are built with Python's tarfile and
gzip and `openssl enc`, so that each fault is exactly the one under test.
"""

import gzip
import functools
import hashlib
import io
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import tarfile
import tempfile
import zlib

from imaging_elements.bundle import bundle
from imaging_elements.sdk.journal import Journal
from tests import base, hookcall, imagebuild

MiB = 1024 * 1024
INTEROP = os.path.join(base.DATA, "euca2ools-bundle")
INTEROP_SHA1 = "dd7d225c264b3814f2fba9aefe106cefe40e3d34"
ELEMENT = os.path.join(base.ROOT, "elements", "bundle-ec2")
BUNDLE_HOOK = os.path.join(ELEMENT, "bundle.d", "50-bundle-ec2")
UNBUNDLE_HOOK = os.path.join(ELEMENT, "unbundle.d", "50-unbundle-ec2")

FIX = {}  # module fixtures: keys, a source image and its bundle (built once)


def setUpModule():
    top = FIX["dir"] = tempfile.mkdtemp(prefix="test-bundle-")
    for who in ("user", "cloud", "other"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN=test-{who}", "-keyout", key(who), "-out", cert(who)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 3 MiB random, 4 MiB zeros, a marker: a few parts at a 1 MiB part size.
    FIX["image"] = os.path.join(top, "disk.img")
    with open(FIX["image"], "wb") as f:
        f.write(os.urandom(3 * MiB) + bytes(4 * MiB) + b"tail-marker")
    FIX["bundle"] = os.path.join(top, "bundle")
    bundle.bundle_image(FIX["image"], FIX["bundle"], arch="x86_64", user="1111-2222-3333",
                        private_key=key("user"), user_cert=cert("user"), ec2_cert=cert("cloud"),
                        part_size=MiB)


def tearDownModule():
    shutil.rmtree(FIX.pop("dir"), ignore_errors=True)


def key(who):
    return os.path.join(FIX["dir"], f"{who}-pk.pem")


def cert(who):
    return os.path.join(FIX["dir"], f"{who}-cert.pem")


sha1_file = functools.partial(base.file_digest, algorithm="sha1")


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def sh(*argv, input=None):
    return subprocess.run([str(a) for a in argv], input=input, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def element_text(manifest_bytes, tag):
    return re.search(rb"<%s[^>]*>([^<]*)</%s>" % (tag.encode(), tag.encode()), manifest_bytes).group(1)


class BundleCase(base.TestCase):

    def copy_bundle(self):
        """A private copy of the shared bundle, to tamper with."""
        path = self.path("bundle")
        shutil.copytree(FIX["bundle"], path)
        return path, os.path.join(path, "disk.img.manifest.xml")

    def unbundle_cli(self, manifest, source, *extra, check=1, private_key=None):
        dest = self.path("out")
        os.makedirs(dest, exist_ok=True)
        result = self.run_bin("euca-unbundle", "-m", manifest, "-s", source, "-d", dest,
                              "-k", private_key or key("cloud"), *extra, check=check)
        return result, dest

    def assertNothingWritten(self, dest):
        self.assertEqual([], os.listdir(dest))

    def hostile_bundle(self, tar_bytes, gzip_bytes=None, name="evil.img", size=None,
                       part_size=None, part_name="{name}.part.{index}"):
        """A bundle of these tar bytes (or of gzip_bytes, if given), made with gzip and openssl enc."""
        directory = self.path("hostile")
        os.makedirs(directory)
        if gzip_bytes is None:
            gzip_bytes = gzip.compress(tar_bytes)
        secret, iv = os.urandom(16), os.urandom(16)
        encrypted = sh("openssl", "enc", "-aes-128-cbc", "-K", secret.hex(), "-iv", iv.hex(),
                       input=gzip_bytes)
        part_size = part_size or len(encrypted)
        parts = []
        for index, start in enumerate(range(0, len(encrypted), part_size)):
            piece = encrypted[start:start + part_size]
            filename = part_name.format(name=name, index=index)
            with open(os.path.join(directory, filename), "wb") as f:
                f.write(piece)
            parts.append(bundle.Part(filename, hashlib.sha1(piece).hexdigest()))
        if size is None:
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
                size = tar.getmembers()[0].size
        manifest = bundle.Manifest(
            name=name, user="1", architecture="x86_64",
            digest=hashlib.sha1(tar_bytes).hexdigest(), size=size,
            bundled_size=len(encrypted), parts=parts)
        data = manifest.seal(secret, iv, bundle.load_private_key(key("user")),
                             bundle.load_certificate_key(cert("user")),
                             bundle.load_certificate_key(cert("cloud")))
        path = os.path.join(directory, f"{name}.manifest.xml")
        with open(path, "wb") as f:
            f.write(data)
        return path


def tar_of(*members):
    """Tar bytes of (TarInfo-fields dict, data) members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for name, value in fields.items():
                setattr(info, name, value)
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


class TestEuca2oolsInterop(BundleCase):
    """The bundle in tests/data was written by euca2ools 3.4."""

    def test_unbundle_with_either_key_is_byte_identical(self):
        with gzip.open(os.path.join(INTEROP, "small.img.gz")) as f:
            original = f.read()
        self.assertEqual(INTEROP_SHA1, hashlib.sha1(original).hexdigest())
        for who in ("user", "cloud"):
            manifest = bundle.read_manifest(os.path.join(INTEROP, "small.img.manifest.xml"))
            output = bundle.unbundle(manifest, self.path(f"small-{who}.img"),
                                     private_key=os.path.join(INTEROP, "keys", f"{who}-pk.pem"))
            with open(output, "rb") as f:
                self.assertEqual(original, f.read(), who)

    def test_cli_verifies_signature_with_the_users_certificate(self):
        keys = os.path.join(INTEROP, "keys")
        result, dest = self.unbundle_cli(os.path.join(INTEROP, "small.img.manifest.xml"), INTEROP,
                                         "--signer-cert", os.path.join(keys, "user-cert.pem"),
                                         private_key=os.path.join(keys, "cloud-pk.pem"), check=0)
        self.assertEqual(f"Wrote {dest}/small.img\n", result.stdout)
        self.assertEqual(INTEROP_SHA1, sha1_file(os.path.join(dest, "small.img")))

    def test_cli_refuses_signature_checked_against_another_certificate(self):
        keys = os.path.join(INTEROP, "keys")
        result, dest = self.unbundle_cli(os.path.join(INTEROP, "small.img.manifest.xml"), INTEROP,
                                         "--signer-cert", os.path.join(keys, "cloud-cert.pem"),
                                         private_key=os.path.join(keys, "user-pk.pem"))
        self.assertIn("signature does not verify", result.stderr)
        self.assertNothingWritten(dest)

    def test_manifest_fields(self):
        manifest = bundle.read_manifest(os.path.join(INTEROP, "small.img.manifest.xml"))
        self.assertEqual(("small.img", "111122223333", "x86_64", "machine", 5242891, 2101520),
                         (manifest.name, manifest.user, manifest.architecture, manifest.image_type,
                          manifest.size, manifest.bundled_size))
        self.assertEqual([bundle.Part("small.img.part.00", "1925d1a15c115e522229dcc6a0bf601dcb0add97")],
                         manifest.parts)
        self.assertEqual("euca2ools", manifest.bundler[0])


class TestBundleFormat(BundleCase):
    """What we write: euca2ools' layout, readable by the plain OpenSSL pipeline."""

    def test_cli_writes_euca2ools_layout_and_manifest(self):
        dest = self.path("dest")
        result = self.run_bin(
            "euca-bundle-image", "-i", FIX["image"], "-r", "i386", "-u", "1111-2222-3333",
            "-k", key("user"), "-c", cert("user"), "--ec2cert", cert("cloud"), "-d", dest,
            "-p", "myimage", "--kernel", "eki-1234", "--ramdisk", "eri-5678",
            "-B", "root=/dev/sda1,ami=sda1", "--productcodes", "P1,P2", "--part-size", "1M", check=0)
        names = sorted(os.listdir(dest))
        parts = [n for n in names if ".part." in n]
        self.assertEqual([f"myimage.part.{i:02d}" for i in range(len(parts))], parts)
        self.assertGreaterEqual(len(parts), 3)
        self.assertEqual(sorted(parts + ["myimage.manifest.xml"]), names)
        self.assertEqual([f"Wrote {dest}/{p}" for p in parts] + [f"Wrote manifest {dest}/myimage.manifest.xml"],
                         result.stdout.splitlines())
        with open(os.path.join(dest, "myimage.manifest.xml"), "rb") as f:
            data = f.read()
        self.assertIn(b"<machine_configuration><architecture>i386</architecture><kernel_id>eki-1234"
                      b"</kernel_id><ramdisk_id>eri-5678</ramdisk_id><block_device_mapping><mapping>"
                      b"<virtual>ami</virtual><device>sda1</device></mapping><mapping><virtual>root"
                      b"</virtual><device>/dev/sda1</device></mapping></block_device_mapping>"
                      b"<product_codes><product_code>P1</product_code><product_code>P2</product_code>"
                      b"</product_codes></machine_configuration>", data)
        manifest = bundle.Manifest.parse(data)
        self.assertEqual(("disk.img", "111122223333", os.path.getsize(FIX["image"])),
                         (manifest.name, manifest.user, manifest.size))
        self.assertEqual(sum(os.path.getsize(os.path.join(dest, p)) for p in parts), manifest.bundled_size)
        for part in manifest.parts:
            self.assertEqual(sha1_file(os.path.join(dest, part.filename)), part.digest)
        result, out = self.unbundle_cli(os.path.join(dest, "myimage.manifest.xml"), dest, check=0,
                                        private_key=key("user"))
        self.assertEqual(sha1_file(FIX["image"]), sha1_file(os.path.join(out, "disk.img")))

    def test_openssl_pipeline_reads_our_bundle(self):
        """The issue's recipe: pkeyutl for key and IV, enc -d, gunzip, tar -x."""
        directory = FIX["bundle"]
        with open(os.path.join(directory, "disk.img.manifest.xml"), "rb") as f:
            data = f.read()
        parts = sorted(n for n in os.listdir(directory) if ".part." in n)
        for who, prefix in (("user", b"user"), ("cloud", b"ec2")):
            secret, iv = (sh("openssl", "pkeyutl", "-decrypt", "-inkey", key(who),
                             input=bytes.fromhex(element_text(data, f"{prefix.decode()}_encrypted_{what}")
                                                 .decode())).decode()
                          for what in ("key", "iv"))
            self.assertRegex(secret, "^[0-9a-f]{32}$")
            out = self.path(who)
            os.mkdir(out)
            script = ('cat "$@" | openssl enc -d -aes-128-cbc -K "$KEY" -iv "$IV" | gunzip '
                      '| tee tar.stream | tar -x -C "$OUT"')
            subprocess.run(["bash", "-o", "pipefail", "-c", script, "-", *parts], check=True,
                           cwd=directory, env=dict(os.environ, KEY=secret, IV=iv, OUT=out))
            self.assertEqual(["disk.img"], os.listdir(out))
            self.assertEqual(sha1_file(FIX["image"]), sha1_file(os.path.join(out, "disk.img")))
            # image/digest is the SHA-1 of the tar stream, not of the image.
            self.assertEqual(element_text(data, "digest").decode(),
                             sha1_file(os.path.join(directory, "tar.stream")))
            os.unlink(os.path.join(directory, "tar.stream"))

    def test_parallel_deflate_writes_one_gzip_member_that_gunzip_and_tar_read(self):
        """Pieces deflated on a pool of threads: one gzip member, the same bytes for any thread count."""
        image = self.path("mixed.img")
        # Text, random, zeros, text: compressible and incompressible pieces,
        # over several pieces, ending off a piece boundary.
        text = b"".join(b"line %d of a compressible file\n" % i for i in range(200000))
        with open(image, "wb") as f:
            f.write(text[:5 * MiB] + os.urandom(5 * MiB) + bytes(3 * MiB) + text[:MiB + 12345])
        secret, iv = os.urandom(16), os.urandom(16)
        bundles = {}
        for threads in (1, 2, 3):
            manifest_path, parts = bundle.bundle_image(
                image, self.path(f"t{threads}"), arch="x86_64", user="1", private_key=key("user"),
                user_cert=cert("user"), ec2_cert=cert("cloud"), key=secret, iv=iv, threads=threads,
                part_size=2 * MiB)
            bundles[threads] = b"".join(read_file(p) for p in parts)
            self.assertGreater(len(parts), 1)
        # Order is kept whatever thread finishes first.
        self.assertEqual(bundles[1], bundles[2])
        self.assertEqual(bundles[1], bundles[3])
        compressed = sh("openssl", "enc", "-d", "-aes-128-cbc", "-K", secret.hex(), "-iv", iv.hex(),
                        input=bundles[2])
        # One member: a reader that stops at the end of the first (zlib, as
        # euca2ools reads) gets the whole tar stream and nothing is left over.
        reader = zlib.decompressobj(31)
        tar_stream = reader.decompress(compressed)
        self.assertTrue(reader.eof)
        self.assertEqual(b"", reader.unused_data)
        with open(manifest_path, "rb") as f:
            self.assertEqual(element_text(f.read(), "digest").decode(), hashlib.sha1(tar_stream).hexdigest())
        # gunzip checks the CRC-32 and the length; GNU tar reads the stream.
        out = self.path("out")
        os.mkdir(out)
        subprocess.run(["bash", "-o", "pipefail", "-c", 'gunzip -c | tar -x -C "$OUT"'],
                       input=compressed, check=True, env=dict(os.environ, OUT=out))
        self.assertEqual(["mixed.img"], os.listdir(out))
        self.assertEqual(sha1_file(image), sha1_file(os.path.join(out, "mixed.img")))
        self.assertEqual(sha1_file(image), sha1_file(bundle.unbundle(
            bundle.read_manifest(manifest_path), self.path("back.img"), private_key=key("cloud"))))

    def bundle_and_decrypt(self, image, **kwargs):
        """Bundle `image` with a known key; (manifest path, the decrypted gzip stream)."""
        secret, iv = os.urandom(16), os.urandom(16)
        manifest_path, parts = bundle.bundle_image(
            image, self.path("b"), arch="x86_64", user="1", private_key=key("user"),
            user_cert=cert("user"), ec2_cert=cert("cloud"), key=secret, iv=iv, **kwargs)
        encrypted = b"".join(read_file(p) for p in parts)
        return manifest_path, sh("openssl", "enc", "-d", "-aes-128-cbc", "-K", secret.hex(),
                                 "-iv", iv.hex(), input=encrypted)

    def test_stored_compressed_and_zero_pieces_read_back_by_every_reader(self):
        """Pieces of random data (stored), text (deflated) and zeros (deflated once): one gzip member."""
        piece = bundle.DEFLATE_CHUNK
        text = b"".join(b"line %d of a compressible file\n" % i for i in range(150000))[:piece]
        image = self.path("mixed.img")
        with open(image, "wb") as f:
            # Whole pieces of each kind, two zero pieces in a row, and a last
            # random piece that ends off a piece boundary.
            f.write(os.urandom(2 * piece) + bytes(2 * piece) + text + os.urandom(piece)
                    + bytes(piece) + os.urandom(MiB + 4321))
        manifest_path, compressed = self.bundle_and_decrypt(image, part_size=3 * MiB)
        with open(manifest_path, "rb") as f:
            digest = element_text(f.read(), "digest").decode()
        # Python's zlib, as euca2ools reads it: one member, the whole tar stream, nothing after.
        reader = zlib.decompressobj(47)
        tar_stream = reader.decompress(compressed)
        self.assertTrue(reader.eof)
        self.assertEqual(b"", reader.unused_data)
        self.assertEqual(digest, hashlib.sha1(tar_stream).hexdigest())
        # gunzip (CRC-32 and length) and GNU tar.
        out = self.path("out")
        os.mkdir(out)
        subprocess.run(["bash", "-o", "pipefail", "-c", 'gunzip -c | tar -x -C "$OUT"'],
                       input=compressed, check=True, env=dict(os.environ, OUT=out))
        self.assertEqual(sha1_file(image), sha1_file(os.path.join(out, "mixed.img")))
        # Our unbundler.
        self.assertEqual(sha1_file(image), sha1_file(bundle.unbundle(
            bundle.read_manifest(manifest_path), self.path("back.img"), private_key=key("cloud"))))
        # The text compressed, the zeros almost vanished: the random data is most of it.
        self.assertLess(len(compressed), (3 * piece + MiB + 4321) * 1.001 + 0.3 * piece)

    def test_incompressible_pieces_are_stored_blocks(self):
        """8 MiB of random data: each piece is stored blocks of the image's bytes, as they are."""
        image = self.path("random.img")
        data = os.urandom(8 * MiB)
        with open(image, "wb") as f:
            f.write(data)
        _, compressed = self.bundle_and_decrypt(image)
        # Within 0.1 % of the input, with the tar header, trailer and gzip framing.
        self.assertLess(len(compressed), len(data) * 1.001 + 1024)
        # Walk the stored blocks (RFC 1951 3.2.4): a byte holding BFINAL 0 and
        # BTYPE 00, LEN, NLEN, then LEN bytes of the image, piece after piece.
        pos = compressed.find(data[:bundle.STORED_BLOCK]) - 5
        self.assertGreaterEqual(pos, 0, "the image's first bytes are not in the stream as they are")
        for piece_start in range(0, len(data), bundle.DEFLATE_CHUNK):
            piece = data[piece_start:piece_start + bundle.DEFLATE_CHUNK]
            for start in range(0, len(piece), bundle.STORED_BLOCK):
                block = piece[start:start + bundle.STORED_BLOCK]
                self.assertEqual(struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF),
                                 compressed[pos:pos + 5], f"block at {piece_start + start}")
                self.assertEqual(block, compressed[pos + 5:pos + 5 + len(block)])
                pos += 5 + len(block)

    def test_pieces_half_compressible_are_deflated_not_stored(self):
        """Random and text in turns of 64 KiB: the samples see both, and the piece is deflated."""
        text = b"".join(b"line %d of a compressible file\n" % i for i in range(3000))[:64 * 1024]
        data = b"".join(os.urandom(64 * 1024) + text for _ in range(3 * MiB // (128 * 1024)))
        self.assertFalse(bundle._incompressible(data))
        compressed, _, _ = bundle._deflate_piece(data, False)
        self.assertLess(sum(map(len, compressed)), 0.6 * len(data))
        self.assertEqual(data, zlib.decompressobj(-15).decompress(b"".join(compressed)))

    def test_piece_encodings_are_raw_deflate_with_the_final_bit_only_when_last(self):
        piece = bundle.DEFLATE_CHUNK
        for name, data in (("random", os.urandom(piece)), ("random, short", os.urandom(MiB + 3)),
                           ("zeros", bytes(piece)), ("text", b"some text\n" * (piece // 10)),
                           ("small", os.urandom(100)), ("empty", b"")):
            for last in (False, True):
                compressed, crc, length = bundle._deflate_piece(data, last)
                reader = zlib.decompressobj(-15)
                self.assertEqual(data, reader.decompress(b"".join(compressed)), name)
                self.assertEqual((last, b""), (reader.eof, reader.unused_data), name)
                self.assertEqual((zlib.crc32(data), len(data)), (crc, length), name)
        # The cached piece of zeros is what deflating it gives.
        for last in (False, True):
            self.assertEqual(b"".join(bundle._deflate(bytes(piece), last)[0]),
                             b"".join(bundle._deflate_piece(bytes(piece), last)[0]))

    def test_openssl_verifies_the_signature_over_the_bytes_in_the_file(self):
        with open(os.path.join(FIX["bundle"], "disk.img.manifest.xml"), "rb") as f:
            data = f.read()
        signed = (re.search(rb"<machine_configuration>.*?</machine_configuration>", data, re.S).group()
                  + re.search(rb"<image>.*?</image>", data, re.S).group())
        with open(self.path("signed"), "wb") as f:
            f.write(signed)
        with open(self.path("sig"), "wb") as f:
            f.write(bytes.fromhex(element_text(data, "signature").decode()))
        with open(self.path("pub.pem"), "wb") as f:
            f.write(sh("openssl", "x509", "-in", cert("user"), "-pubkey", "-noout"))
        out = sh("openssl", "dgst", "-sha1", "-verify", self.path("pub.pem"), "-signature",
                 self.path("sig"), self.path("signed"))
        self.assertEqual(b"Verified OK\n", out)

    def test_part_names_grow_past_99(self):
        image = self.path("small.img")
        with open(image, "wb") as f:
            f.write(os.urandom(110 * 1024))
        manifest_path, parts = bundle.bundle_image(
            image, self.path("b"), arch="x86_64", user="1", private_key=key("user"),
            user_cert=cert("user"), ec2_cert=cert("cloud"), part_size=1024)
        names = [os.path.basename(p) for p in parts]
        self.assertGreater(len(names), 100)
        self.assertEqual(["small.img.part.00", "small.img.part.99", "small.img.part.100"],
                         [names[0], names[99], names[100]])
        output = bundle.unbundle(bundle.read_manifest(manifest_path), self.path("back.img"),
                                 private_key=key("cloud"))
        self.assertEqual(sha1_file(image), sha1_file(output))

    def test_unbundled_zeros_are_holes(self):
        manifest = bundle.read_manifest(os.path.join(FIX["bundle"], "disk.img.manifest.xml"))
        output = bundle.unbundle(manifest, self.path("disk.img"), private_key=key("user"))
        self.assertEqual(sha1_file(FIX["image"]), sha1_file(output))
        # 4 MiB of the 7 MiB are zeros: they take no space.
        self.assertLess(os.stat(output).st_blocks * 512, 3 * MiB + 128 * 1024)

    def test_images_of_8_gib_and_more_get_a_pax_size(self):
        header = bundle._tar_header("big.img", 9 * 1024 * MiB, 0)
        with tarfile.open(fileobj=io.BytesIO(header), mode="r|") as tar:
            info = tar.next()
        self.assertEqual(("big.img", 9 * 1024 * MiB), (info.name, info.size))

    def test_gnu_sparse_tar_with_ec2_ami_tools_part_names(self):
        """ec2-ami-tools bundles with tar -S and names parts .part.0, .part.1, ..."""
        for fmt, sparse_type in (("gnu", tarfile.GNUTYPE_SPARSE), ("posix", tarfile.REGTYPE)):
            source = self.path(fmt, "sparse.img")
            os.makedirs(os.path.dirname(source))
            with open(source, "wb") as f:
                f.truncate(6 * MiB)
                for offset in (0, 2 * MiB + 5, 5 * MiB):
                    f.seek(offset)
                    f.write(os.urandom(3000))
            tar_bytes = sh("tar", f"--format={fmt}", "-S", "-c", "-f", "-", "-C", os.path.dirname(source),
                           "sparse.img")
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
                member = tar.getmembers()[-1]
                self.assertEqual((sparse_type, True), (member.type, member.issparse()))
            manifest = self.hostile_bundle(tar_bytes, name="sparse.img", size=6 * MiB,
                                           part_size=4096, part_name="{name}.part.{index}")
            self.assertTrue(os.path.exists(os.path.join(os.path.dirname(manifest), "sparse.img.part.1")))
            output = bundle.unbundle(bundle.read_manifest(manifest), self.path(fmt, "out.img"),
                                     private_key=key("cloud"))
            self.assertEqual(sha1_file(source), sha1_file(output), fmt)
            shutil.rmtree(self.path("hostile"))


class TestBadBundles(BundleCase):
    """Each fault: a clear error naming what failed, exit 1, nothing at the output."""

    def test_tampered_part(self):
        path, manifest = self.copy_bundle()
        with open(os.path.join(path, "disk.img.part.01"), "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"part {path}/disk.img.part.01: SHA-1 is", result.stderr)
        self.assertIn("corrupt, truncated or was altered", result.stderr)
        self.assertNothingWritten(dest)

    def test_truncated_part(self):
        path, manifest = self.copy_bundle()
        with open(os.path.join(path, "disk.img.part.00"), "r+b") as f:
            f.truncate(MiB - 100)
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"part {path}/disk.img.part.00: SHA-1 is", result.stderr)
        self.assertNothingWritten(dest)

    def test_missing_part(self):
        path, manifest = self.copy_bundle()
        os.unlink(os.path.join(path, "disk.img.part.02"))
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"part {path}/disk.img.part.02: No such file or directory", result.stderr)
        self.assertNothingWritten(dest)

    def edit_manifest(self, manifest, old, new):
        with open(manifest, "rb") as f:
            data = f.read()
        self.assertIn(old, data)
        with open(manifest, "wb") as f:
            f.write(data.replace(old, new, 1))

    def test_tampered_manifest_fails_the_signature(self):
        path, manifest = self.copy_bundle()
        self.edit_manifest(manifest, b"<architecture>x86_64", b"<architecture>i386")
        result, dest = self.unbundle_cli(manifest, path, "--signer-cert", cert("user"))
        self.assertIn(f"manifest {manifest}: the signature does not verify with {cert('user')}",
                      result.stderr)
        self.assertNothingWritten(dest)

    def test_bad_signature(self):
        path, manifest = self.copy_bundle()
        with open(manifest, "rb") as f:
            signature = element_text(f.read(), "signature")
        flipped = (b"0" if signature[:1] != b"0" else b"1") + signature[1:]
        self.edit_manifest(manifest, signature, flipped)
        result, dest = self.unbundle_cli(manifest, path, "--signer-cert", cert("user"))
        self.assertIn("the signature does not verify", result.stderr)
        self.assertNothingWritten(dest)

    def test_wrong_size_in_unsigned_check(self):
        path, manifest = self.copy_bundle()
        size = str(os.path.getsize(FIX["image"])).encode()
        self.edit_manifest(manifest, b"<size>" + size, b"<size>" + str(int(size) + 1).encode())
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"the image is {int(size)} bytes, the manifest says {int(size) + 1}", result.stderr)
        self.assertNothingWritten(dest)

    def test_wrong_image_digest(self):
        path, manifest = self.copy_bundle()
        with open(manifest, "rb") as f:
            digest = element_text(f.read(), "digest")
        self.edit_manifest(manifest, digest, b"0" * 40)
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"the image's tar stream has SHA-1 {digest.decode()}, the manifest says "
                      + "0" * 40, result.stderr)
        self.assertNothingWritten(dest)

    def test_wrong_key(self):
        path, manifest = self.copy_bundle()
        result, dest = self.unbundle_cli(manifest, path, private_key=key("other"))
        self.assertIn(f"private key {key('other')} cannot decrypt the bundle's key", result.stderr)
        self.assertNothingWritten(dest)

    def test_part_names_with_a_directory_are_refused(self):
        for bad in (b"../disk.img.part.00", b"sub/disk.img.part.00", b".."):
            path, manifest = self.copy_bundle()
            self.edit_manifest(manifest, b"<filename>disk.img.part.00<", b"<filename>" + bad + b"<")
            result, dest = self.unbundle_cli(manifest, path)
            self.assertIn(f"part file name {bad.decode()!r} is not a plain file name", result.stderr)
            self.assertNothingWritten(dest)
            shutil.rmtree(path)

    def test_image_name_with_a_directory_is_refused(self):
        path, manifest = self.copy_bundle()
        self.edit_manifest(manifest, b"<name>disk.img</name>", b"<name>../../etc/passwd</name>")
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn("image name '../../etc/passwd' is not a plain file name", result.stderr)
        self.assertNothingWritten(dest)

    def test_entities_and_dtds_are_refused(self):
        path, manifest = self.copy_bundle()
        laughs = (b'<!DOCTYPE manifest [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;">'
                  b'<!ENTITY c SYSTEM "file:///etc/passwd">]>\n<manifest>')
        self.edit_manifest(manifest, b"<manifest>", laughs)
        self.edit_manifest(manifest, b"<user>111122223333", b"<user>&b;&c;")
        result, dest = self.unbundle_cli(manifest, path)
        self.assertIn(f"manifest {manifest}: not a valid manifest", result.stderr)
        self.assertIn("DTDForbidden", result.stderr)
        self.assertNothingWritten(dest)

    def test_not_a_manifest(self):
        with open(self.path("junk.xml"), "wb") as f:
            f.write(b"\x00junk")
        result, dest = self.unbundle_cli(self.path("junk.xml"), self.tmp)
        self.assertIn(f"manifest {self.path('junk.xml')}: not a valid manifest", result.stderr)
        self.assertNothingWritten(dest)

    def check_hostile(self, manifest, message):
        result, dest = self.unbundle_cli(manifest, os.path.dirname(manifest))
        self.assertIn(message, result.stderr)
        self.assertNothingWritten(dest)

    def test_two_tar_members(self):
        tar_bytes = tar_of(({"name": "evil.img"}, b"a" * 1000), ({"name": "second"}, b"b" * 10))
        self.check_hostile(self.hostile_bundle(tar_bytes, size=1000),
                           "the tar stream holds more than the image file")

    def test_symlink_member(self):
        tar_bytes = tar_of(({"name": "evil.img", "type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}, None))
        self.check_hostile(self.hostile_bundle(tar_bytes, size=0), "is not a regular file")

    def test_member_name_with_a_directory(self):
        tar_bytes = tar_of(({"name": "../evil.img"}, b"x" * 100))
        self.check_hostile(self.hostile_bundle(tar_bytes), "the tar member '../evil.img' is not a plain file name")

    def test_huge_tar_header_is_refused_with_bounded_memory(self):
        # A GNU long name of 8 MiB: refused before it is read into memory.
        tar_bytes = tar_of(({"name": "n" * (8 * MiB)}, b"x"))
        self.check_hostile(self.hostile_bundle(tar_bytes, size=1),
                           f"the tar headers are larger than {bundle.MAX_TAR_HEADER} bytes")

    def test_data_after_the_gzip_stream(self):
        tar_bytes = tar_of(({"name": "evil.img"}, b"x" * 100))
        self.check_hostile(self.hostile_bundle(tar_bytes, gzip.compress(tar_bytes) + b"trailing"),
                           "data follows the end of the gzip stream")

    def test_truncated_gzip_stream(self):
        tar_bytes = tar_of(({"name": "evil.img"}, os.urandom(5000)))
        self.check_hostile(self.hostile_bundle(tar_bytes, gzip.compress(tar_bytes)[:-100]),
                           "the gzip stream is truncated")

    def test_bundle_refuses_bad_parameters(self):
        common = ("-i", FIX["image"], "-u", "1", "-k", key("user"), "-c", cert("user"),
                  "--ec2cert", cert("cloud"), "-d", self.path("d"))
        result = self.run_bin("euca-bundle-image", "-r", "sparc", *common, check=2)
        self.assertIn("invalid choice: 'sparc'", result.stderr)
        result = self.run_bin("euca-bundle-image", "-r", "x86_64", *common, "--kernel", "true",
                              "-B", "ami=sda1", check=2)
        self.assertIn("block device mappings are not compatible with image type 'kernel'", result.stderr)
        result = self.run_bin("euca-bundle-image", "-r", "x86_64", *common[:-2], "-d", self.path("d"),
                              "-c", self.path("missing.pem"), check=1)
        self.assertIn(f"certificate {self.path('missing.pem')}: No such file or directory", result.stderr)
        result = self.run_bin("euca-bundle-image", "-r", "x86_64", "-i", FIX["image"], "-k", key("user"),
                              "-c", cert("user"), "--ec2cert", cert("cloud"), "-d", self.path("d"),
                              check=2, env={"EC2_USER_ID": ""})
        self.assertIn("missing account ID; please supply one with -u", result.stderr)
        self.assertFalse(os.path.exists(self.path("d")))

    def test_image_that_is_a_directory(self):
        result = self.run_bin("euca-bundle-image", "-i", self.tmp, "-r", "x86_64", "-u", "1",
                              "-k", key("user"), "-c", cert("user"), "--ec2cert", cert("cloud"),
                              "-d", self.path("dest"), check=1)
        self.assertIn(f"image {self.tmp}: Is a directory", result.stderr)
        self.assertFalse(os.path.exists(self.path("dest")))

    def test_failed_part_write_names_the_part_and_leaves_nothing(self):
        """The writer thread fails (file size limit) while the reader and deflate threads run."""
        image = self.path("big.img")
        with open(image, "wb") as f:
            f.write(os.urandom(24 * MiB))
        dest = self.path("dest")

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal

        result = subprocess.run(
            [sys.executable, os.path.join(base.BIN, "euca-bundle-image"), "-i", image, "-r", "x86_64",
             "-u", "1", "-k", key("user"), "-c", cert("user"), "--ec2cert", cert("cloud"), "-d", dest],
            preexec_fn=limit, capture_output=True, text=True, timeout=120)
        self.assertEqual(1, result.returncode, result.stderr)
        self.assertEqual(f"euca-bundle-image: error: part big.img.part.00 in {dest}: File too large\n",
                         result.stderr)
        self.assertFalse(os.path.exists(dest))

    def test_image_that_shrinks_while_being_bundled(self):
        """The image is cut short while its pieces are read on the deflate threads:
        a clear error naming it, and nothing left at the destination."""
        image = self.path("shrinking.img")
        with open(image, "wb") as f:
            f.write(os.urandom(40 * MiB))

        def shrink(done, total):
            os.truncate(image, 13 * MiB)  # the pieces after this one read short

        dest = self.path("dest")
        with self.assertRaises(bundle.BundleError) as caught:
            bundle.bundle_image(image, dest, arch="x86_64", user="1", private_key=key("user"),
                                user_cert=cert("user"), ec2_cert=cert("cloud"), progress=shrink)
        found = re.fullmatch(rf"image {re.escape(image)}: ended after (\d+) of {40 * MiB} bytes "
                             r"\(did it change while being bundled\?\)", str(caught.exception))
        self.assertIsNotNone(found, str(caught.exception))
        # Where a piece read short: pieces are read ahead, some before the cut.
        self.assertTrue(13 * MiB <= int(found.group(1)) < 40 * MiB, found.group(1))
        self.assertFalse(os.path.exists(dest))

    def test_interrupted_bundle_leaves_nothing(self):
        """Interrupted midway (Ctrl-C while the parts are written): no parts, no manifest."""
        def interrupt(done, total):
            if done >= 2 * MiB:
                raise KeyboardInterrupt()
        existing, new = self.path("existing"), self.path("new")
        os.makedirs(existing)
        with open(os.path.join(existing, "keep"), "w") as f:
            f.write("x")
        for dest in (existing, new):
            with self.assertRaises(KeyboardInterrupt):
                bundle.bundle_image(FIX["image"], dest, arch="x86_64", user="1", private_key=key("user"),
                                    user_cert=cert("user"), ec2_cert=cert("cloud"), part_size=MiB,
                                    progress=interrupt)
        self.assertEqual(["keep"], os.listdir(existing))
        self.assertFalse(os.path.exists(new))


class TestMemory(BundleCase):

    def peak_rss(self, name, *args):
        """Run a driver from bin/; its peak RSS in bytes.

        VmHWM of its own address space, sampled while it runs (a high-water mark, so
        the last sample is the peak but for its last moments): the rusage of wait4
        would also count the test runner's pages, copied at fork, before the exec."""
        peak = 0
        with open(self.path(f"{name}.err"), "w") as err:
            process = subprocess.Popen([sys.executable, os.path.join(base.BIN, name), *args],
                                       stdout=subprocess.DEVNULL, stderr=err)
            while process.poll() is None:
                try:
                    with open(f"/proc/{process.pid}/status") as f:
                        hwm = [line for line in f if line.startswith("VmHWM:")]
                    if hwm:
                        peak = max(peak, int(hwm[0].split()[1]) * 1024)
                except OSError:
                    pass
                time.sleep(0.01)
        with open(self.path(f"{name}.err")) as err:
            self.assertEqual(0, process.returncode, err.read())
        self.assertGreater(peak, 0)
        return peak

    def test_memory_is_bounded(self):
        image = self.path("big.img")
        with open(image, "wb") as f:
            for _ in range(48):
                f.write(os.urandom(MiB))
            f.truncate(320 * MiB)
        dest = self.path("b")
        rss = self.peak_rss("euca-bundle-image", "-i", image, "-r", "x86_64", "-u", "1", "-k", key("user"),
                            "-c", cert("user"), "--ec2cert", cert("cloud"), "-d", dest)
        self.assertLess(rss, 100 * MiB)
        os.mkdir(self.path("out"))
        rss = self.peak_rss("euca-unbundle", "-m", os.path.join(dest, "big.img.manifest.xml"), "-s", dest,
                            "-d", self.path("out"), "-k", key("cloud"))
        self.assertLess(rss, 100 * MiB)
        self.assertEqual(sha1_file(image), sha1_file(self.path("out", "big.img")))


class TestHooks(BundleCase):
    """The bundle-ec2 hooks, run directly with the documented environment."""

    def hook(self, path, verb="run", **env):
        """Run as a process runs it (tests/hookcall.py), its work directory self.path("work")."""
        if not hasattr(self, "state"):
            self.state = hookcall.state(self.path("work"))
        result = hookcall.completed(hookcall.hook(path), dict(self.state, **env), verb)
        return result, result.status

    def bundle_env(self, **extra):
        return dict(IMG_BUNDLE_USER="1234", IMG_BUNDLE_ARCH="x86_64", IMG_BUNDLE_PRIVATE_KEY=key("user"),
                    IMG_BUNDLE_CERT=cert("user"), IMG_BUNDLE_CLOUD_CERT=cert("cloud"), **extra)

    def test_bundle_then_unbundle(self):
        output = self.path("out.bundle")
        result, status = self.hook(BUNDLE_HOOK, IMG_IMAGE=FIX["image"], IMG_INPUT="/somewhere/web.img",
                                   IMG_SOURCE_TYPE="raw", IMG_DEST_TYPE="bundle", IMG_CONVERT_OUTPUT=output,
                                   IMG_BUNDLE_KERNEL="eki-1", IMG_BUNDLE_BLOCK_DEVICE_MAPPING="ami=sda1",
                                   **self.bundle_env())
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertIn({"describe": f"bundled {FIX['image']} as web.img: web.img.manifest.xml and 1 part"},
                      status)
        self.assertTrue(any("progress" in s for s in status))
        self.assertEqual(["web.img.manifest.xml", "web.img.part.00"], sorted(os.listdir(output)))
        # Only the temporary directory was journaled, and it is gone.
        self.assertEqual([], Journal(self.state["IMG_JOURNAL"]).unwind())
        self.assertTrue(os.path.isdir(output))

        image = self.path("back.img")
        result, status = self.hook(UNBUNDLE_HOOK, IMG_IMAGE=os.path.join(output, "web.img.manifest.xml"),
                                   IMG_SOURCE_TYPE="bundle", IMG_CONVERT_OUTPUT=image,
                                   IMG_UNBUNDLE_KEY=key("cloud"), IMG_UNBUNDLE_SIGNER_CERT=cert("user"))
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertEqual(sha1_file(FIX["image"]), sha1_file(image))
        self.assertIn({"set": {"IMG_BUNDLE_ARCH": "x86_64"}}, status)
        self.assertIn({"set": {"IMG_BUNDLE_PREFIX": "web.img"}}, status)
        self.assertIn({"set": {"IMG_BUNDLE_KERNEL": "eki-1"}}, status)
        self.assertIn({"set": {"IMG_BUNDLE_BLOCK_DEVICE_MAPPING": "ami=sda1"}}, status)
        self.assertIn({"describe": f"unbundled web.img ({os.path.getsize(FIX['image'])} bytes, 1 part, "
                                   "signature verified)"}, status)

    def test_unbundle_hook_accepts_only_bundles(self):
        from imaging_elements.engine import hooks
        hook = hooks.Hook("unbundle", "50-unbundle-ec2", UNBUNDLE_HOOK, "bundle-ec2")
        self.assertEqual((True, ""), hooks.accepts(hook, {"source-type": "bundle"}, os.environ))
        self.assertEqual((False, "source-type raw is not one of: bundle"),
                         hooks.accepts(hook, {"source-type": "raw"}, os.environ))

    def test_failing_unbundle_hook_leaves_nothing(self):
        path, manifest = self.copy_bundle()
        with open(os.path.join(path, "disk.img.part.00"), "r+b") as f:
            f.write(b"tampered")
        os.mkdir(self.path("out"))
        image = self.path("out", "image.raw")
        result, status = self.hook(UNBUNDLE_HOOK, IMG_IMAGE=manifest, IMG_SOURCE_TYPE="bundle",
                                   IMG_CONVERT_OUTPUT=image, IMG_UNBUNDLE_KEY=key("user"))
        self.assertEqual(1, result.returncode)
        self.assertIn(f"part {path}/disk.img.part.00: SHA-1 is ", status[-1]["fail"])
        self.assertEqual([], os.listdir(self.path("out")))
        self.assertEqual([], Journal(self.state["IMG_JOURNAL"]).unwind())

    def test_missing_parameters_are_named(self):
        result, status = self.hook(BUNDLE_HOOK, IMG_IMAGE=FIX["image"], IMG_CONVERT_OUTPUT=self.path("o"),
                                   IMG_BUNDLE_USER="1")
        self.assertEqual(1, result.returncode)
        self.assertEqual({"fail": "needs IMG_BUNDLE_ARCH, IMG_BUNDLE_PRIVATE_KEY, IMG_BUNDLE_CERT, "
                                  "IMG_BUNDLE_CLOUD_CERT (pass -e BUNDLE_ARCH=... -e BUNDLE_PRIVATE_KEY=... "
                                  "-e BUNDLE_CERT=... -e BUNDLE_CLOUD_CERT=...)"}, status[-1])
        self.assertFalse(os.path.exists(self.path("o")))

    def test_key_material_never_reaches_the_status_channel(self):
        output = self.path("out.bundle")
        result, status = self.hook(BUNDLE_HOOK, IMG_IMAGE=FIX["image"], IMG_CONVERT_OUTPUT=output,
                                   **self.bundle_env())
        self.assertEqual(0, result.returncode)
        with open(key("user")) as f:
            pem_line = f.read().splitlines()[1]
        self.assertNotIn(pem_line, result.stdout + result.stderr)


class TestProcess(BundleCase):
    """Through euca-image-process, with a real ext4 image mounted at the end."""

    needs_root = True

    def process(self, *args, check=0):
        return self.run_bin("euca-image-process", *args, check=check)

    def test_bundle_unbundle_rebundle_and_mount(self):
        tree = imagebuild.linux_tree(self.path("tree"), extra={"etc/motd": "bundled by a test\n"})
        image = imagebuild.make_fs(self.path("root.img"), tree, size=24 * MiB, label="rootfs")
        keys = ["-e", f"BUNDLE_PRIVATE_KEY={key('user')}", "-e", f"BUNDLE_CERT={cert('user')}",
                "-e", f"BUNDLE_CLOUD_CERT={cert('cloud')}", "-e", "BUNDLE_USER=111122223333"]
        self.process("-i", image, "-o", self.path("first"), "-T", "bundle", "-e", "BUNDLE_ARCH=i386",
                     "-e", "BUNDLE_RAMDISK=eri-1", *keys, "bundle-ec2")
        self.assertEqual(["root.img.manifest.xml", "root.img.part.00"], sorted(os.listdir(self.path("first"))))
        # Unbundle and bundle again: the architecture and ramdisk come from the first manifest.
        self.process("-i", self.path("first", "root.img.manifest.xml"), "-o", self.path("second"),
                     "-T", "bundle", "-e", f"UNBUNDLE_KEY={key('cloud')}",
                     "-e", f"UNBUNDLE_SIGNER_CERT={cert('user')}", *keys, "bundle-ec2")
        manifest = bundle.read_manifest(self.path("second", "root.img.manifest.xml"))
        self.assertEqual(("i386", "eri-1", "root.img"), (manifest.architecture, manifest.ramdisk_id, manifest.name))
        back = bundle.unbundle(manifest, self.path("back.img"), private_key=key("user"),
                               signer_cert=cert("user"))
        self.assertEqual(sha1_file(image), sha1_file(back))
        mnt = self.path("mnt")
        os.mkdir(mnt)
        device = imagebuild.sh("losetup", "--find", "--show", "--read-only", back).strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", device])
        imagebuild.sh("mount", "-o", "ro,nodev,nosuid", device, mnt)
        self.addCleanup(subprocess.run, ["umount", mnt])
        with open(os.path.join(mnt, "etc", "motd")) as f:
            self.assertEqual("bundled by a test\n", f.read())

    def test_tampered_bundle_fails_the_process_and_leaves_nothing(self):
        path, manifest = self.copy_bundle()
        with open(os.path.join(path, "disk.img.part.01"), "r+b") as f:
            f.write(b"tampered")
        os.mkdir(self.path("out"))
        keys = ["-e", f"BUNDLE_PRIVATE_KEY={key('user')}", "-e", f"BUNDLE_CERT={cert('user')}",
                "-e", f"BUNDLE_CLOUD_CERT={cert('cloud')}", "-e", "BUNDLE_USER=1"]
        result = self.process("-i", manifest, "-o", self.path("out", "again"), "-T", "bundle",
                              "-e", f"UNBUNDLE_KEY={key('user')}", *keys, "bundle-ec2", check=None)
        self.assertNotEqual(0, result.returncode)
        self.assertIn(f"part {path}/disk.img.part.01: SHA-1 is", result.stderr)
        self.assertEqual([], os.listdir(self.path("out")))
