"""The converters end to end, through bin/euca-image-process: chains, capacity,
atomic output, bad input, cancellation, and the mounters on a converted AMI."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests import base, imagebuild

MiB = imagebuild.MiB
FIXTURES = None


def setUpModule():
    """A raw disk with 20 MiB of random data in an ext4 partition, and its vhdx."""
    global FIXTURES
    FIXTURES = tempfile.mkdtemp(prefix="test-convert-e2e-")
    tree = imagebuild.linux_tree(os.path.join(FIXTURES, "tree"), extra={
        "var/lib/data.bin": random.Random(11).randbytes(20 * MiB)})
    fs = imagebuild.make_fs(os.path.join(FIXTURES, "fs.img"), tree, size=40 * MiB, label="rootfs")
    disk = imagebuild.make_disk(os.path.join(FIXTURES, "disk.raw"), [{"image": fs, "bootable": True}])
    imagebuild.qemu_convert(disk, os.path.join(FIXTURES, "disk.vhdx"), "vhdx")
    imagebuild.qemu_convert(disk, os.path.join(FIXTURES, "disk.vmdk"), "vmdk", "subformat=streamOptimized")
    imagebuild.random_file(os.path.join(FIXTURES, "random.raw"), 96, seed=13)


def tearDownModule():
    shutil.rmtree(FIXTURES, ignore_errors=True)


def fixture(name):
    return os.path.join(FIXTURES, name)


def qemu_img_processes(under):
    """qemu-img processes working on files under `under` (confined: by their open files)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-img") and (under in cmd or base.holds_files(pid, under)):
            found.append(cmd)
    return found


class E2ECase(base.TestCase):
    needs_root = True

    def process(self, *args, check=None):
        self.status_file = self.path("events.jsonl")
        return self.run_bin("euca-image-process", "--status-file", self.status_file, *args, check=check)

    def events(self, name=None):
        with open(self.status_file) as f:
            records = [json.loads(line) for line in f]
        return [r for r in records if name is None or r["event"] == name]

    def tmpfs(self, name, size, readonly=False):
        path = self.path(name)
        os.makedirs(path)
        imagebuild.sh("mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if readonly else ""),
                      "tmpfs", path)
        self.addCleanup(imagebuild.sh, "umount", path)
        return path

    def assertNothingLeft(self, output):
        self.assertFalse(os.path.exists(output), f"{output} exists")
        directory = os.path.dirname(output)
        self.assertEqual([], [n for n in os.listdir(directory) if ".partial-" in n])
        self.assertEqual([], qemu_img_processes(self.tmp))


class TestChains(E2ECase):

    def test_vhdx_to_stream_optimized_vmdk_in_one_step(self):
        output = self.path("out.vmdk")
        work = self.path("work")
        self.process("-i", fixture("disk.vhdx"), "-o", output, "-T", "vmdk", "--work-dir", work,
                     "convert-qemu", check=0)
        ran = [e["hook"] for e in self.events("hook-end") if e["result"] == "ok"]
        self.assertEqual(["55-qemu-to-qemu"], ran)  # no intermediate raw disk
        info = json.loads(imagebuild.sh("qemu-img", "info", "--output=json", "-f", "vmdk", output))
        self.assertEqual("streamOptimized", info["format-specific"]["data"]["create-type"])
        # Progress in bytes, up to the whole disk.
        size = os.path.getsize(fixture("disk.raw"))
        progress = [e for e in self.events("progress") if e["hook"] == ran[0]]
        self.assertEqual((size, size), (progress[-1]["done"], progress[-1]["total"]))
        imagebuild.sh("qemu-img", "convert", "-f", "vmdk", "-O", "raw", output, self.path("back.raw"))
        subprocess.run(["cmp", fixture("disk.raw"), self.path("back.raw")], check=True)
        scratch = os.path.join(work, "scratch")
        self.assertEqual([], os.listdir(scratch) if os.path.isdir(scratch) else [])
        self.assertEqual(["back.raw", "events.jsonl", "out.vmdk"],
                         sorted(n for n in os.listdir(self.tmp) if n != "work"))

    def test_stream_optimized_vmdk_to_sparse_raw(self):
        output = self.path("out.raw")
        self.process("-i", fixture("disk.vmdk"), "-o", output, "-T", "raw", "convert-qemu", check=0)
        subprocess.run(["cmp", fixture("disk.raw"), output], check=True)
        data = json.loads(imagebuild.sh("qemu-img", "map", "--output=json", "-f", "raw", fixture("disk.raw")))
        data = sum(e["length"] for e in data if e["data"])
        self.assertLess(os.stat(output).st_blocks * 512, 1.05 * data)


    def test_same_type_is_re_encoded(self):
        source = imagebuild.qemu_convert(fixture("disk.raw"), self.path("in.vmdk"), "vmdk",
                                         "subformat=monolithicSparse")
        output = self.path("out.vmdk")
        self.process("-i", source, "-o", output, "-T", "vmdk", "convert-qemu", check=0)
        self.assertEqual(["55-qemu-to-qemu"], [e["hook"] for e in self.events("hook-end")])
        info = json.loads(imagebuild.sh("qemu-img", "info", "--output=json", "-f", "vmdk", output))
        self.assertEqual("streamOptimized", info["format-specific"]["data"]["create-type"])


class TestPartitionToDisk(E2ECase):

    def test_ami_to_qcow2_then_the_mounters_and_validators(self):
        """partition -> raw -> qcow2, then mount-qemu-fuse + mount-disk and validate-linux on it."""
        tree = imagebuild.debian_tree(self.path("tree"))
        source = imagebuild.make_fs(self.path("debian.ext4"), tree, size=512 * MiB, label="rootfs")
        shutil.rmtree(tree)
        output = self.path("out.qcow2")
        self.process("-i", source, "-o", output, "-T", "qcow2", "--size", "1G",
                     "partition-to-disk", "convert-qemu", check=0)
        ran = [e["hook"] for e in self.events("hook-end") if e["result"] == "ok"]
        self.assertEqual(["40-partition-to-disk", "60-raw-to-qemu"], ran)
        info = json.loads(imagebuild.sh("qemu-img", "info", "--output=json", "-f", "qcow2", output))
        self.assertEqual(1 << 30, info["virtual-size"])
        result = self.process("-i", output, "mounters", "validate-linux", check=0)
        checks = {e["hook"]: e for e in self.events("hook-end") if e["phase"] == "validate"}
        self.assertEqual("ok", checks["35-linux-bootloader"]["result"], result.stderr)
        self.assertIn("extlinux", checks["35-linux-bootloader"]["description"])
        self.assertEqual("ok", checks["30-linux-kernel"]["result"])
        self.assertEqual("ok", checks["20-linux-fstab"]["result"])


class TestCapacity(E2ECase):

    def test_output_filesystem_too_small(self):
        small = self.tmpfs("small", "4m")
        output = os.path.join(small, "out.raw")
        started = time.monotonic()
        result = self.process("-i", fixture("disk.vhdx"), "-o", output, "-T", "raw", "convert-qemu", check=4)
        self.assertLess(time.monotonic() - started, 30)
        self.assertRegex(result.stderr, r"not enough space: needs \d+ bytes in " + small +
                         r", \d+ bytes free in the output directory")
        self.assertEqual([], os.listdir(small))   # not one byte written
        self.assertEqual([], [e for e in self.events("hook-start") if e["phase"] == "convert"])

    def test_scratch_too_small_for_the_intermediate_disk(self):
        work = self.tmpfs("work", "8m")
        output = self.path("out.vmdk")
        # partition -> raw disk (in the scratch space) -> vmdk
        result = self.process("-i", fixture("fs.img"), "-t", "partition", "-o", output, "-T", "vmdk", "--work-dir",
                              os.path.join(work, "w"), "partition-to-disk", "convert-qemu", check=4)
        self.assertIn("free in the work directory", result.stderr)
        self.assertNothingLeft(output)

    def test_scratch_limit(self):
        output = self.path("out.vmdk")
        result = self.process("-i", fixture("fs.img"), "-t", "partition", "-o", output, "-T", "vmdk",
                              "--scratch-limit", "1M", "partition-to-disk", "convert-qemu", check=4)
        self.assertIn("left of --scratch-limit", result.stderr)
        self.assertNothingLeft(output)


class TestBadInput(E2ECase):

    def corrupt(self, name, at, data):
        path = self.path(name)
        shutil.copy(fixture("disk.vmdk"), path)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data)
        return path

    def test_fuzzed_vmdk(self):
        source = self.corrupt("fuzzed.vmdk", 20, (3).to_bytes(8, "little"))   # grain size
        output = self.path("out.raw")
        result = self.process("-i", source, "-o", output, "-T", "raw", "convert-qemu", check=3)
        self.assertIn(source, result.stderr)
        self.assertIn("damaged or truncated", result.stderr)
        self.assertNothingLeft(output)

    def test_truncated_qcow2(self):
        source = imagebuild.qemu_convert(fixture("disk.raw"), self.path("in.qcow2"), "qcow2")
        os.truncate(source, os.path.getsize(source) * 2 // 3)
        output = self.path("out.vmdk")
        result = self.process("-i", source, "-o", output, "-T", "vmdk", "convert-qemu", check=3)
        self.assertIn(f"{source}: truncated qcow2 image", result.stderr)
        self.assertNothingLeft(output)

    def test_type_that_does_not_match_the_content(self):
        output = self.path("out.raw")
        result = self.process("-i", fixture("disk.vhdx"), "-t", "vmdk", "-o", output, "-T", "raw",
                              "convert-qemu", check=3)
        self.assertIn(f"{fixture('disk.vhdx')}: declared as vmdk but the content is vhdx", result.stderr)
        self.assertNothingLeft(output)

    def test_unwritable_output_directory(self):
        readonly = self.tmpfs("readonly", "4m", readonly=True)
        output = os.path.join(readonly, "out.raw")
        result = self.process("-i", fixture("disk.vhdx"), "-o", output, "-T", "raw", "convert-qemu", check=3)
        self.assertIn(f"{output}: output directory {readonly} is not writable", result.stderr)

    def test_a_failed_conversion_leaves_an_existing_output_alone(self):
        output = self.path("out.raw")
        with open(output, "w") as f:
            f.write("previous result\n")
        source = self.corrupt("fuzzed.vmdk", 20, (3).to_bytes(8, "little"))
        self.process("-i", source, "-o", output, "-T", "raw", "convert-qemu", check=3)
        with open(output) as f:
            self.assertEqual("previous result\n", f.read())
        self.assertEqual([], [n for n in os.listdir(self.tmp) if ".partial-" in n])


class TestCancel(E2ECase):

    def test_sigterm_during_a_conversion(self):
        """vhdx -> vmdk, stopped while qemu-img writes."""
        source = imagebuild.qemu_convert(fixture("random.raw"), self.path("in.vhdx"), "vhdx")
        output = self.path("out.vmdk")
        status_file = self.path("events.jsonl")
        work = self.path("work")
        process = subprocess.Popen(
            [sys.executable, os.path.join(base.BIN, "euca-image-process"), "--status-file", status_file,
             "--work-dir", work, "-i", source, "-o", output, "-T", "vmdk", "convert-qemu"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(status_file):
                with open(status_file) as f:
                    if any('"progress"' in line and '"55-qemu-to-qemu"' in line and '"done": 0,' not in line
                           for line in f):
                        break
            time.sleep(0.05)
        self.assertTrue(qemu_img_processes(self.tmp), "the conversion was not under way")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        self.assertEqual(143, process.returncode)
        time.sleep(0.2)
        self.assertNothingLeft(output)
        leftovers = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(work, "scratch")) for n in names]
        self.assertEqual([], leftovers)
