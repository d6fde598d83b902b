"""The mounters end to end, through euca-image-process, on real images (root)."""

import json
import os
import random

from tests import base
from tests.imagebuild import MiB
from tests.test_mount_support import copy, image, test_elements


class MountProcessTest(base.TestCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        self.elements = test_elements(self.path("elements"))

    def process(self, *args, check=None):
        return self.run_bin("euca-image-process", "--elements-path", self.elements, *args, check=check)

    def show(self, path, *args):
        out = self.path("show.json")
        result = self.process("-i", path, "-e", f"SHOW_OUT={out}", *args, "mounters", "show-tree", check=0)
        with open(out) as f:
            return json.load(f), result

    def test_vmdk_stream_optimized(self):
        shown, result = self.show(image("vmdk-stream"))
        self.assertEqual("linux", shown["platform"])
        self.assertEqual({"/", "/boot"}, set(shown["mounts"]))
        for fstype, options in shown["mounts"].values():
            self.assertEqual("ext4", fstype)
            self.assertTrue({"ro", "nodev", "nosuid"} <= set(options), options)
        self.assertIn("/boot/from-boot-partition", shown["files"])
        self.assertIn("/etc/fstab", shown["files"])
        self.assertEqual(["/boot", "/"], [fs["mountpoint"] for fs in shown["filesystems"]])
        self.assertIn("vmdk exported as a raw view", result.stderr)

    def test_gpt_disk(self):
        shown, _ = self.show(image("linux-gpt"))
        self.assertEqual({"/", "/boot/efi", "/var"}, set(shown["mounts"]))
        self.assertEqual(("xfs", "btrfs"), (shown["mounts"]["/"][0], shown["mounts"]["/var"][0]))
        # The ESP is a read-only bind of an mtools copy: no vfat driver here.
        self.assertTrue({"ro", "nodev", "nosuid"} <= set(shown["mounts"]["/boot/efi"][1]))
        self.assertIn("/boot/efi/EFI/debian/grubx64.efi", shown["files"])

    def test_windows(self):
        shown, _ = self.show(image("windows"))
        self.assertEqual("windows", shown["platform"])
        self.assertEqual("fuseblk", shown["mounts"]["/"][0])
        self.assertIn("/Windows/System32/config/SYSTEM", shown["files"])

    def test_declared_platform_is_kept(self):
        shown, result = self.show(image("linux-dos"), "--platform", "linux")
        self.assertEqual("linux", shown["platform"])

    def test_unknown_format(self):
        path = self.path("noise.img")
        with open(path, "wb") as f:
            f.write(random.Random(1).randbytes(2 * MiB))
        result = self.process("-i", path, "mounters", check=3)
        self.assertIn(f"{path}: unknown image format", result.stderr)

    def test_declared_type_mismatch(self):
        result = self.process("-i", image("qcow2"), "-t", "vmdk", "mounters", check=3)
        self.assertIn("declared as vmdk but the content is qcow2", result.stderr)

    def test_truncated_disk(self):
        path = copy("linux-dos", self.tmp)
        os.truncate(path, 30 * MiB)
        work = self.path("work")
        result = self.process("-i", path, "--work-dir", work, "mounters", check=3)
        self.assertIn(f"{path}: partition 2 ends at byte 51380224, past the end of the disk", result.stderr)
        self.assertEqual([], os.listdir(os.path.join(work, "mnt")))

    def test_no_root(self):
        result = self.process("-i", image("no-root"), "mounters", check=3)
        self.assertIn("no recognisable root", result.stderr)
        self.assertIn("90-mount-check", result.stderr)

    def test_vmdk_without_the_container_mounter(self):
        result = self.process("-i", image("vmdk-stream"), "mount-disk", check=1)
        self.assertIn("a vmdk image was not turned into a raw disk: add the mount-qemu-fuse element",
                      result.stderr)
