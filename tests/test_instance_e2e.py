"""The whole import through bin/euca-image-process, ending with a real boot.

* A bootable Debian 12 disk (tests.imagebuild.debian_boot_disk) as a
  streamOptimized VMDK: mount, validate, convert to raw, boot, and every
  instance validator passes.
* The Debian 12 root as a partition (AMI) image: partition-to-disk makes a
  disk of it, and that disk boots and passes (the conversion makes a bootable
  disk).
* A disk whose init fails: the process fails with the panic in its message,
  and leaves no output.
"""

import json
import os
import shutil
import tempfile
import time

from imaging_elements.engine import imagetype
from tests import base, imagebuild
from tests.test_instance import edit_fs

MiB = imagebuild.MiB
STOCK = {"10-multi-user", "20-root-rw", "30-network-dhcp", "40-no-failed-units", "50-sshd", "60-hostname",
         "70-key-injection"}
FIXTURES = None


def setUpModule():
    global FIXTURES
    FIXTURES = tempfile.mkdtemp(prefix="test-instance-e2e-", dir="/var/tmp")


def tearDownModule():
    shutil.rmtree(FIXTURES, ignore_errors=True)


def debian_boot_vmdk():
    """debian_boot_disk() as a streamOptimized VMDK, as a user would upload it (cached)."""
    raw = imagebuild.debian_boot_disk()
    name = os.path.basename(raw)[:-len(".raw")] + ".vmdk"
    return imagebuild._cached(name, lambda out: imagebuild.qemu_convert(raw, out, "vmdk",
                                                                         "subformat=streamOptimized"))


class TestImport(base.TestCase):
    needs_root = True

    def process(self, image, output, *elements, check=None):
        """euca-image-process; returns (CompletedProcess, [events])."""
        status = self.path("status.jsonl")
        result = self.run_bin("euca-image-process", "-i", image, "-o", output, "-T", "raw",
                              "--status-file", status, *elements, check=check)
        with open(status) as f:
            return result, [json.loads(line) for line in f]

    def instance_results(self, events):
        return {e["hook"]: e for e in events
                if e.get("event") == "hook-end" and e.get("phase") == "instance-validate"}

    def test_vmdk_import_boots_and_passes(self):
        image = debian_boot_vmdk()
        output = self.path("imported.raw")
        result, events = self.process(image, output, "mounters", "validate-linux", "convert-qemu",
                                      "instance-validate-linux", check=0)
        booted = self.instance_results(events)
        self.assertEqual(STOCK, set(booted))
        self.assertEqual({"ok"}, {e["result"] for e in booted.values()}, booted)
        self.assertIn("ens3 has 10.0.2.15/24 from", booted["30-network-dhcp"]["description"])
        converted = [e for e in events if e.get("event") == "hook-end" and e.get("phase") == "convert"]
        self.assertEqual(["ok"], [e["result"] for e in converted])
        self.assertEqual("raw", imagetype.detect(output))
        self.assertEqual(imagebuild.sh("qemu-img", "compare", "-f", "vmdk", "-F", "raw", image, output).strip(),
                         "Images are identical.")  # the boot changed nothing in the output

    def test_partition_image_converted_to_disk_boots(self):
        image = imagebuild.debian_root_fs()
        kernel, ramdisk = imagebuild.debian_kernel_files()
        output = self.path("ami-disk.raw")
        # The AMI way: the kernel and ramdisk come from outside (aki/ari).
        result, events = self.process(image, output, "--kernel", kernel, "--ramdisk", ramdisk, "mounters",
                                      "validate-linux", "partition-to-disk", "instance-validate-linux", check=0)
        converted = [e for e in events if e.get("event") == "hook-end" and e.get("phase") == "convert"]
        self.assertEqual([("40-partition-to-disk", "ok")], [(e["hook"], e["result"]) for e in converted])
        booted = self.instance_results(events)
        self.assertEqual(STOCK, set(booted))
        self.assertEqual({"ok"}, {e["result"] for e in booted.values()}, booted)
        # Booted through the boot loader partition-to-disk installed: the root is a partition.
        self.assertIn("(/dev/vda1, ext4)", booted["20-root-rw"]["description"])
        self.assertEqual("raw", imagetype.detect(output))

    def test_failing_init_fails_the_process_without_output(self):
        image = os.path.join(FIXTURES, "bad-init.raw")
        imagebuild.sh("cp", "--sparse=always", imagebuild.debian_boot_disk(), image)
        edit_fs(image, MiB, lambda root: (os.unlink(os.path.join(root, "usr", "sbin", "init")),
                                          os.symlink("/bin/false", os.path.join(root, "usr", "sbin", "init"))))
        output = self.path("never.raw")
        started = time.monotonic()
        result, events = self.process(image, output, "mounters", "validate-linux", "convert-qemu",
                                      "instance-validate-linux", check=1)
        # Static validation cannot see it (/sbin/init is an executable); the boot does.
        self.assertEqual(["ok"], [e["result"] for e in events
                                  if e.get("event") == "hook-end" and e.get("hook") == "40-linux-init"])
        self.assertIn("instance-validate: ", result.stderr)
        # The image booted is the converted output: named as the user named it, not as our partial file.
        self.assertIn(output, result.stderr)
        self.assertNotIn(".partial-", result.stderr)
        self.assertIn(": the guest kernel panicked: Attempted to kill init! exitcode=0x00000100", result.stderr)
        self.assertRegex(result.stderr, r"console log: \S+/logs/instance-console\.log; it ends:")
        self.assertIn("end Kernel panic - not syncing: Attempted to kill init!", result.stderr)
        # A panic ends the boot at once, not at IMG_INSTANCE_TIMEOUT (300 s).
        self.assertLess(time.monotonic() - started, 150)
        self.assertFalse(os.path.exists(output))
        self.assertEqual([], [n for n in os.listdir(self.tmp) if n.startswith(".never.raw")])
