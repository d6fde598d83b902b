"""Hostile container images that name host files (issue 10): each one through
the README pipeline, through the mounters alone, and straight to a confined
qemu-img with the early check skipped (the sandbox alone must hold).

The "host" is a directory outside the upload directory with a secret file
and a bootable-looking Linux disk; the upload directory also holds another
user's upload.  Every case must fail with a message naming the user's file
and the name it references, leave no output, and put no host byte anywhere.
"""

import os
import shutil
import struct
import tempfile

from imaging_elements.convert import qemuimg
from tests import base, imagebuild

MiB = imagebuild.MiB
MARK = b"HOST-SECRET-0123456789abcdef\n"
HOST = None


def setUpModule():
    global HOST
    HOST = tempfile.mkdtemp(prefix="test-hostile-host-")
    with open(os.path.join(HOST, "secret"), "wb") as f:
        f.write(MARK * (4096 // len(MARK) + 1))
    tree = imagebuild.linux_tree(os.path.join(HOST, "tree"), extra={"root/host-only": MARK})
    fs = imagebuild.make_fs(os.path.join(HOST, "fs.img"), tree, size=24 * MiB, label="rootfs")
    imagebuild.make_disk(os.path.join(HOST, "disk.raw"), [{"image": fs, "bootable": True}])
    imagebuild.qemu_convert(os.path.join(HOST, "disk.raw"), os.path.join(HOST, "disk.vmdk"), "vmdk",
                            "subformat=monolithicSparse")


def tearDownModule():
    shutil.rmtree(HOST, ignore_errors=True)


def host(name):
    return os.path.join(HOST, name)


def descriptor(*extents, comments=0):
    """A VMDK text descriptor with these extent lines (after `comments` bytes of comments)."""
    padding = ("# padding\n" * (comments // 10 + 1)) if comments else ""
    return ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            'createType="monolithicFlat"\n\n' + padding + "\n".join(extents) + "\n\n"
            'ddb.adapterType = "ide"\n').encode()


def disk_sectors():
    return os.path.getsize(host("disk.raw")) // 512


class HostileCase(base.TestCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        self.upload = self.path("upload")
        os.makedirs(self.upload)
        with open(os.path.join(self.upload, "other-user.raw"), "wb") as f:
            f.write(MARK * 256)

    def write(self, name, data):
        path = os.path.join(self.upload, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    # -- the hostile images -------------------------------------------------------

    def sparse_vmdk_embedding(self, text):
        """A sparse VMDK with capacity 0: qemu reads its embedded descriptor as a
        whole descriptor file, extents and all."""
        path = os.path.join(self.upload, "sparse.vmdk")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "vmdk", path, "1M")
        with open(path, "r+b") as f:
            head = f.read(512)
            desc_offset, desc_size = struct.unpack_from("<QQ", head, 28)
            self.assertGreaterEqual(desc_size * 512, len(text))
            f.seek(12)
            f.write(struct.pack("<Q", 0))  # capacity 0
            f.seek(desc_offset * 512)
            f.write(text.ljust(desc_size * 512, b"\0"))
        return path

    def qcow2_with_data_file(self):
        """An external data file naming the host's secret (the name patched in, so
        that creating the image does not touch the host file)."""
        target = host("secret").encode()
        dummy = os.path.join(self.upload, "d" * (len(target) - len(self.upload) - 1))
        path = os.path.join(self.upload, "data.qcow2")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={dummy},data_file_raw=on",
                      path, "4K")
        os.unlink(dummy)
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(len(dummy), len(target))
        with open(path, "wb") as f:
            f.write(data.replace(dummy.encode(), target))
        return path

    def cases(self):
        """(name, path, type, the referenced name the message must show)."""
        secret, disk = host("secret"), host("disk.raw")
        n = disk_sectors()
        return [
            ("sparse vmdk, capacity 0, embedded descriptor",
             self.sparse_vmdk_embedding(descriptor(f'RW {n} FLAT "{disk}" 0', f'RW 8 FLAT "{secret}" 0')),
             "vmdk", disk),
            ("flat extent with sector count +2",
             self.write("plus.vmdk", descriptor(f'RW +{n} FLAT "{disk}" 0', f'RW +2 FLAT "{secret}" 0')),
             "vmdk", disk),
            ("extent after 64 KiB of comments",
             self.write("late.vmdk", descriptor(f'RW {n} FLAT "{disk}" 0', comments=70000)), "vmdk", disk),
            ("fields separated by vertical tabs",
             self.write("vtab.vmdk", descriptor(f'RW\v{n}\vFLAT\v"{disk}"\v0')), "vmdk", disk),
            ("extent naming another upload in the same directory",
             self.write("same-dir.vmdk", descriptor('RW 512 FLAT "other-user.raw" 0')), "vmdk",
             "other-user.raw"),
            ("qcow2 with a backing file", self.qcow2_backing(disk), "qcow2", disk),
            ("qcow2 with an external data file", self.qcow2_with_data_file(), "qcow2", secret),
            ("vmdk with a parent disk", self.vmdk_child(), "vmdk", host("disk.vmdk")),
            ("VMFS extent type", self.write("vmfs.vmdk", descriptor(f'RW {n} VMFS "{disk}"')), "vmdk", disk),
            ("qcow2 backing file given as json:", self.qcow2_backing(
                'json:{"driver": "raw", "file": {"driver": "file", "filename": "' + disk + '"}}'),
             "qcow2", "json:"),
        ]

    def qcow2_backing(self, disk):
        path = os.path.join(self.upload, f"backing-{len(os.listdir(self.upload))}.qcow2")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", disk, path, "24M")
        return path

    def vmdk_child(self):
        path = os.path.join(self.upload, "child.vmdk")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", host("disk.vmdk"), path)
        return path

    # -- checks -----------------------------------------------------------------------

    def assertNoHostBytes(self, directory):
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                if name == "other-user.raw" or not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    self.assertNotIn(MARK, f.read(), f"{path} holds host bytes")


class TestPipeline(HostileCase):
    """The README's pipeline and the mounters alone: refused, named, nothing written."""

    def test_readme_pipeline(self):
        out_dir = self.path("out")
        os.makedirs(out_dir)
        for what, path, image_type, referenced in self.cases():
            output = os.path.join(out_dir, "out.raw")
            result = self.run_bin("euca-image-process", "-i", path, "-t", image_type, "-o", output,
                                  "-T", "raw", "mounters", "validate-linux", "convert-qemu")
            self.assertNotEqual(0, result.returncode, f"{what}: accepted\n{result.stderr}")
            self.assertIn(path, result.stderr, what)
            self.assertIn(f"'{referenced}", result.stderr, what)
            self.assertIn("refusing", result.stderr, what)
            self.assertNotIn("Traceback", result.stderr, what)
            self.assertEqual([], os.listdir(out_dir), what)
            self.assertNoHostBytes(self.tmp)

    def test_mounters_only(self):
        for what, path, image_type, referenced in self.cases():
            result = self.run_bin("euca-image-process", "-i", path, "-t", image_type, "mounters")
            self.assertNotEqual(0, result.returncode, f"{what}: accepted\n{result.stderr}")
            self.assertIn(path, result.stderr, what)
            self.assertIn(f"'{referenced}", result.stderr, what)
            self.assertNotIn("Traceback", result.stderr, what)
            self.assertNoHostBytes(self.tmp)


class TestSandboxAlone(HostileCase):
    """With the early check skipped, a confined qemu-img still cannot open a host
    file or another upload: the conversion fails and no host byte is written."""

    def test_convert_without_the_check(self):
        for what, path, image_type, referenced in self.cases():
            output = self.path("out.raw")
            with self.assertRaises(qemuimg.QemuImgError, msg=what) as caught:
                qemuimg.convert(path, image_type, output, "raw", virtual=MiB)
            self.assertIn(path, str(caught.exception), what)
            self.assertFalse(os.path.exists(output), what)
            self.assertNoHostBytes(self.tmp)
