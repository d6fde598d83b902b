"""Fuzzed, truncated and unreadable inputs (issue 11): every one is bad input,
exit 3 (docs/configuration.md), through the README pipeline with the stock
mounters and convert-qemu, and through the API: one line naming the user's
file and the reason, no traceback, no output file, nothing leaked."""

import os
import random
import shutil
import tempfile

from imaging_elements import api
from tests import base, imagebuild
from tests.test_mount_support import test_elements

MiB = imagebuild.MiB
GOOD = None
README = ("mounters", "validate-linux", "convert-qemu")


def setUpModule():
    global GOOD
    GOOD = tempfile.mkdtemp(prefix="test-bad-input-")
    tree = imagebuild.linux_tree(os.path.join(GOOD, "tree"))
    fs = imagebuild.make_fs(os.path.join(GOOD, "fs.ext4"), tree, size=24 * MiB, label="rootfs")
    raw = imagebuild.make_disk(os.path.join(GOOD, "disk.raw"), [{"image": fs, "bootable": True}])
    imagebuild.qemu_convert(raw, os.path.join(GOOD, "disk.vmdk"), "vmdk", "subformat=monolithicSparse")
    imagebuild.qemu_convert(raw, os.path.join(GOOD, "disk.qcow2"), "qcow2")
    imagebuild.qemu_convert(raw, os.path.join(GOOD, "disk.vhd"), "vpc")


def tearDownModule():
    shutil.rmtree(GOOD, ignore_errors=True)


def good(name):
    with open(os.path.join(GOOD, name), "rb") as f:
        return bytearray(f.read())


def fuzz(seed, size):
    return random.Random(seed).randbytes(size)


def truncated(name, fraction=3):
    data = good(name)
    return bytes(data[:len(data) // fraction])


def vhd_with_a_garbled_body():
    data = good("disk.vhd")
    data[512:-512] = fuzz(4, len(data) - 1024)  # the footers stay: it is still a VHD
    return bytes(data)


def bad_superblock():
    """blkid still sees ext4 (magic and checksum are not checked the kernel's way),
    the kernel refuses it: s_log_block_size = 40."""
    data = good("disk.raw")
    start = imagebuild.partitions(os.path.join(GOOD, "disk.raw"))[0]["start"]
    data[start + 1024 + 24:start + 1024 + 28] = (40).to_bytes(4, "little")
    return bytes(data)


def overlapping_partitions():
    data = good("disk.raw")
    entry = 446 + 16  # a second dos entry over the first partition
    data[entry:entry + 16] = data[446:462]
    data[entry] = 0
    return bytes(data)


class BadInputTest(base.TestCase):
    needs_root = True

    def cases(self):
        """(what, path, declared type or None, words the error must hold)."""
        upload = self.path("upload")
        os.makedirs(upload)

        def write(name, data):
            path = os.path.join(upload, name)
            with open(path, "wb") as f:
                f.write(data)
            return path
        directory = os.path.join(upload, "dir.raw")
        os.mkdir(directory)
        return [
            ("random bytes named .vmdk", write("random.vmdk", fuzz(1, 2 * MiB)), None, "unknown image format"),
            ("random bytes declared qcow2", write("random.qcow2", fuzz(2, 2 * MiB)), "qcow2",
             "declared as qcow2 but the content is unknown"),
            ("random bytes named .vhd", write("random.vhd", fuzz(3, MiB)), None, "unknown image format"),
            ("qcow2 magic, then garbage", write("magic.qcow2", b"QFI\xfb" + fuzz(5, MiB)), None,
             "not a readable qcow2 image"),
            ("VHD footer, garbled body", write("garbled.vhd", vhd_with_a_garbled_body()), None,
             "not a readable vhd image"),
            ("truncated VMDK", write("truncated.vmdk", truncated("disk.vmdk")), None, "vmdk"),
            ("truncated qcow2", write("truncated.qcow2", truncated("disk.qcow2")), None,
             "corrupt or truncated"),
            ("partition table past the end", write("half.raw", truncated("disk.raw", 2)), None,
             "past the end of the disk"),
            ("overlapping partitions", write("overlap.raw", overlapping_partitions()), None, "overlap"),
            ("unreadable ext4 superblock", write("badsb.raw", bad_superblock()), None,
             "the kernel cannot mount it as ext4"),
            ("zero-length file", write("empty.raw", b""), None, "the file is empty"),
            ("a directory", directory, None, "not a regular file"),
            ("no such file", os.path.join(upload, "missing.vmdk"), None, "no such file"),
        ]

    def assertNothingWritten(self, out_dir, what):
        self.assertEqual([], os.listdir(out_dir), f"{what}: output left behind")

    def test_readme_pipeline_exits_3(self):
        out_dir = self.path("out")
        os.makedirs(out_dir)
        cases = self.cases()
        self.assertGreaterEqual(len(cases), 8)
        for what, path, declared, words in cases:
            output = os.path.join(out_dir, "out.raw")
            args = ["-i", path, "-o", output, "-T", "raw", *README] + (["-t", declared] if declared else [])
            result = self.run_bin("euca-image-process", *args)
            self.assertEqual(3, result.returncode, f"{what}: exit {result.returncode}\n{result.stderr}")
            last = result.stderr.strip().splitlines()[-1]
            self.assertTrue(last.startswith("euca-image-process: error: "), f"{what}: {last}")
            self.assertIn(path, last, what)
            self.assertIn(words, last, what)
            self.assertNotIn("Traceback", result.stderr, what)
            self.assertNotIn('{"bad-input"', result.stderr, what)  # in words, not the raw status line
            self.assertNotIn("/dev/loop", last, what)  # the user's file, not our devices
            self.assertNotIn(".partial-", last, what)
            self.assertNothingWritten(out_dir, what)

    def test_converter_alone_exits_3(self):
        """Without the mounters, convert-qemu finds the damage (or its capacity check does)."""
        out_dir = self.path("out")
        os.makedirs(out_dir)
        for what, path, _, words in self.cases():
            if not path.endswith((".qcow2", ".vmdk", ".vhd")) or "random" in path:
                continue
            result = self.run_bin("euca-image-process", "-i", path, "-o", os.path.join(out_dir, "out.raw"),
                                  "-T", "raw", "convert-qemu")
            self.assertEqual(3, result.returncode, f"{what}: exit {result.returncode}\n{result.stderr}")
            self.assertIn(path, result.stderr.strip().splitlines()[-1], what)
            self.assertNotIn("Traceback", result.stderr, what)
            self.assertNotIn('{"bad-input"', result.stderr, what)  # once, in words (also from required-capacity)
            self.assertNothingWritten(out_dir, what)

    def test_api_exit_code_3(self):
        out_dir = self.path("out")
        os.makedirs(out_dir)
        for what, path, declared, words in self.cases():
            if what not in ("truncated qcow2", "unreadable ext4 superblock", "random bytes named .vmdk"):
                continue
            request = api.ProcessRequest(elements=list(README), input=path, input_type=declared,
                                         output=os.path.join(out_dir, "out.raw"), output_type="raw",
                                         work_dir=self.path("work-" + os.path.basename(path)))
            result = api.run_process(request)
            self.assertEqual(3, result.exit_code, f"{what}: {result.error}")
            self.assertIn(path, result.error, what)
            self.assertIn(words, result.error, what)
            self.assertNothingWritten(out_dir, what)

    def test_a_host_fault_is_not_bad_input(self):
        """A mounter that fails at a step of its own (the host's fault, not the image's) stays
        exit 1, and so does an element missing from the list."""
        result = self.run_bin("euca-image-process", "--elements-path", test_elements(self.path("elements")),
                              "-i", os.path.join(GOOD, "disk.raw"), "-e", "MOUNT_FAULT=loop", "mounters")
        self.assertEqual(1, result.returncode, result.stderr)
        self.assertIn("fault injected after step 'loop'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        result = self.run_bin("euca-image-process", "-i", os.path.join(GOOD, "disk.vmdk"), "mount-disk")
        self.assertEqual(1, result.returncode, result.stderr)
