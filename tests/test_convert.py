"""The convert-qemu element's hooks, run directly: real images in every format and back."""

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

from imaging_elements.convert import qemuimg
from imaging_elements.engine import hookrun, hooks, runner
from imaging_elements.sdk.journal import Journal
from tests import base, hookcall, imagebuild

MiB = imagebuild.MiB
ELEMENTS = os.path.join(base.ROOT, "elements")
TO_RAW = os.path.join(ELEMENTS, "convert-qemu", "convert.d", "50-qemu-to-raw")
FROM_RAW = os.path.join(ELEMENTS, "convert-qemu", "convert.d", "60-raw-to-qemu")
TO_QEMU = os.path.join(ELEMENTS, "convert-qemu", "convert.d", "55-qemu-to-qemu")
FIXTURES = None


def scratch(tmp):
    """The scratch space of the hooks run in `tmp` (the work directory is tmp/work)."""
    return os.path.join(tmp, "work", "scratch")


def hook_state(tmp, **extra):
    """A process's state for a convert.d hook, its work directory tmp/work, then `extra`."""
    return hookcall.state(os.path.join(tmp, "work"), **extra)


def hook_env(path, tmp, **extra):
    """The environment the runner gives the convert.d hook at `path` (its status lines go to
    stderr: no IMG_STATUS_FD), for the tests that signal the hook's own process."""
    return runner.hook_environment(hookcall.hook(path, "convert"), hook_state(tmp, **extra))


def run_hook(path, tmp, **extra):
    """Run the convert.d hook at `path` as a process runs it; (exit code, what it said, its
    output); unwinds the hook's journal after."""
    state = hook_state(tmp, **extra)
    try:
        ran = hookcall.run(hookcall.hook(path, "convert"), state)
    finally:
        Journal(state["IMG_JOURNAL"]).unwind()
    return ran.code, ran.said, ran.text


def required_capacity(path, tmp, **extra):
    """What the hook says it needs, asked as the runner asks it (raises hooks.HookError);
    unwinds what the asking kept (its qemu-img answers), as the end of a process does."""
    state = hook_state(tmp, **extra)
    try:
        return hookcall.required_capacity(hookcall.hook(path, "convert"), state)
    finally:
        Journal(state["IMG_JOURNAL"]).unwind()


def accepts(path, tmp, **extra):
    """(accepted, reason) as the runner asks the hook."""
    return hookcall.accepts(hookcall.hook(path, "convert"), hook_state(tmp, **extra))


def status(said, key):
    return said.get(key, [])


def allocated(path):
    return os.stat(path).st_blocks * 512


def qemu_info(path, driver=None):
    return json.loads(imagebuild.sh("qemu-img", "info", "--output=json", *(["-f", driver] if driver else []),
                                    path))


def setUpModule():
    """One real disk (MBR + ext4 holding a Linux tree and 4 MiB of random data), shared."""
    global FIXTURES
    FIXTURES = tempfile.mkdtemp(prefix="test-convert-")
    tree = imagebuild.linux_tree(os.path.join(FIXTURES, "tree"), extra={
        "var/lib/data.bin": random.Random(5).randbytes(4 * MiB)})
    fs = imagebuild.make_fs(os.path.join(FIXTURES, "fs.img"), tree, size=30 * MiB, label="rootfs")
    imagebuild.make_disk(os.path.join(FIXTURES, "disk.raw"), [{"image": fs, "bootable": True}])
    # A raw disk that takes a while to compress, for interrupting a conversion.
    imagebuild.random_file(os.path.join(FIXTURES, "random.raw"), 96, seed=7)


def tearDownModule():
    shutil.rmtree(FIXTURES, ignore_errors=True)


class ConvertCase(base.TestCase):

    disk = property(lambda self: os.path.join(FIXTURES, "disk.raw"))

    def convert(self, hook, source, source_type, dest_type, name=None, expect=0, **extra):
        output = self.path(name or f"out.{dest_type}")
        code, records, text = run_hook(hook, self.tmp, IMG_IMAGE=source,
                                       IMG_SOURCE_TYPE=source_type, IMG_DEST_TYPE=dest_type,
                                       IMG_CONVERT_OUTPUT=output, **extra)
        self.assertEqual(expect, code, f"{records} {text}")
        return output, records


class TestRoundTrips(ConvertCase):

    def round_trip(self, dest_type, driver, subformat=None, **extra):
        exported, records = self.convert(FROM_RAW, self.disk, "raw", dest_type, **extra)
        info = qemu_info(exported, driver)
        self.assertEqual(driver, info["format"])
        self.assertEqual(os.path.getsize(self.disk), info["virtual-size"])
        if subformat:
            self.assertEqual(subformat, info["format-specific"]["data"]["create-type"])
        # Progress went forward to the whole disk, and the hook said what it did.
        done = [p["done"] for p in status(records, "progress")]
        self.assertEqual(sorted(done), done)
        self.assertEqual({os.path.getsize(self.disk)}, {p["total"] for p in status(records, "progress")})
        self.assertEqual(os.path.getsize(self.disk), done[-1])
        self.assertIn(f"converted raw to {dest_type}", status(records, "describe")[0])
        back, _ = self.convert(TO_RAW, exported, dest_type, "raw", name="back.raw")
        subprocess.run(["cmp", self.disk, back], check=True)
        return exported, back

    def test_vmdk_is_stream_optimized_by_default(self):
        self.round_trip("vmdk", "vmdk", "streamOptimized")

    def test_vmdk_monolithic_sparse(self):
        self.round_trip("vmdk", "vmdk", "monolithicSparse", IMG_VMDK_SUBFORMAT="monolithicSparse")

    def test_qcow2(self):
        self.round_trip("qcow2", "qcow2")

    def test_vhd_dynamic_keeps_the_exact_size(self):
        self.round_trip("vhd", "vpc")

    def test_vhd_fixed(self):
        exported, _ = self.round_trip("vhd", "vpc", IMG_VHD_SUBFORMAT="fixed")
        self.assertEqual(os.path.getsize(self.disk) + 512, os.path.getsize(exported))

    def test_vhdx(self):
        self.round_trip("vhdx", "vhdx")

    def test_raw_output_stays_sparse(self):
        _, back = self.round_trip("qcow2", "qcow2")
        data = qemuimg.data_bytes(self.disk, "raw")
        self.assertLess(allocated(back), 1.05 * data + MiB)
        self.assertLess(allocated(back), os.path.getsize(back) / 2)

    def test_raw_to_raw_is_a_sparse_copy(self):
        copy, records = self.convert(TO_RAW, self.disk, "raw", "raw")
        subprocess.run(["cmp", self.disk, copy], check=True)
        self.assertLessEqual(allocated(copy), allocated(self.disk))
        self.assertIn("converted raw to raw", status(records, "describe")[0])

class TestQemuToQemu(ConvertCase):

    def test_monolithic_sparse_to_stream_optimized(self):
        sparse = imagebuild.qemu_convert(self.disk, self.path("in.vmdk"), "vmdk", "subformat=monolithicSparse")
        stream, _ = self.convert(TO_QEMU, sparse, "vmdk", "vmdk")
        self.assertEqual("streamOptimized", qemu_info(stream, "vmdk")["format-specific"]["data"]["create-type"])
        back, _ = self.convert(TO_RAW, stream, "vmdk", "raw", name="back.raw")
        subprocess.run(["cmp", self.disk, back], check=True)

    def test_between_formats_in_one_step(self):
        vmdk = imagebuild.qemu_convert(self.disk, self.path("in.vmdk"), "vmdk")
        stream, _ = self.convert(TO_QEMU, vmdk, "vmdk", "qcow2", name="direct.qcow2")
        self.assertEqual("qcow2", qemu_info(stream, "qcow2")["format"])
        back, _ = self.convert(TO_RAW, stream, "qcow2", "raw", name="back.raw")
        subprocess.run(["cmp", self.disk, back], check=True)


class TestSize(ConvertCase):

    def test_grow_while_exporting(self):
        grown = 64 * MiB
        exported, records = self.convert(FROM_RAW, self.disk, "raw", "qcow2", IMG_SIZE="64M")
        self.assertEqual(grown, qemu_info(exported)["virtual-size"])
        self.assertIn("grown from", status(records, "describe")[0])
        back, _ = self.convert(TO_RAW, exported, "qcow2", "raw", name="back.raw")
        self.assertEqual(grown, os.path.getsize(back))
        size = os.path.getsize(self.disk)
        subprocess.run(["cmp", "-n", str(size), self.disk, back], check=True)
        with open(back, "rb") as f:
            f.seek(size)
            self.assertEqual(b"", f.read().strip(b"\0"))
        # The added zeros were not written.
        self.assertLess(allocated(back), allocated(self.disk) + MiB)

    def test_grow_raw(self):
        copy, _ = self.convert(TO_RAW, self.disk, "raw", "raw", IMG_SIZE=str(40 * MiB))
        self.assertEqual(40 * MiB, os.path.getsize(copy))

    def test_never_shrinks(self):
        output, records = self.convert(TO_RAW, self.disk, "raw", "raw", expect=1, IMG_SIZE="1M")
        self.assertIn("is smaller than", status(records, "fail")[0])
        self.assertIn(self.disk, status(records, "fail")[0])
        self.assertFalse(os.path.exists(output))


class TestCapacity(ConvertCase):

    def test_required_capacity_covers_what_is_written(self):
        for dest_type, hook, extra in (("raw", TO_RAW, {}), ("vmdk", FROM_RAW, {}),
                                       ("qcow2", FROM_RAW, {}), ("vhd", FROM_RAW, {}),
                                       ("vhdx", FROM_RAW, {}),
                                       ("vhd", FROM_RAW, {"IMG_VHD_SUBFORMAT": "fixed"})):
            need = required_capacity(hook, self.tmp, IMG_IMAGE=self.disk, IMG_SOURCE_TYPE="raw",
                                     IMG_DEST_TYPE=dest_type, **extra)
            output, _ = self.convert(hook, self.disk, "raw", dest_type, name=f"cap.{dest_type}", **extra)
            written = allocated(output)
            self.assertGreaterEqual(need, written, f"{dest_type} {extra}")
            # ... and is an estimate of the data, not of the virtual size (fixed VHD aside).
            if not extra:
                self.assertLess(need, os.path.getsize(self.disk) + 9 * MiB, dest_type)
            os.unlink(output)

    def test_capacity_of_a_later_chain_step_is_read_from_the_current_image(self):
        """Asked before step 1 runs, step 2 (raw -> vmdk) measures the current vhdx image."""
        vhdx = imagebuild.qemu_convert(self.disk, self.path("in.vhdx"), "vhdx")
        need = required_capacity(FROM_RAW, self.tmp, IMG_IMAGE=vhdx, IMG_IMAGE_TYPE="vhdx",
                                 IMG_SOURCE_TYPE="raw", IMG_DEST_TYPE="vmdk")
        self.assertGreater(need, qemuimg.data_bytes(vhdx, "vhdx"))


class TestVhdx(ConvertCase):
    """VHDX: a log to replay after an unclean shutdown; capacity from the data."""

    def test_a_log_to_replay_is_replayed_on_a_copy(self):
        vhdx = imagebuild.dirty_vhdx(self.disk, self.path("dirty.vhdx"))
        if vhdx is None:
            self.skipTest("qemu-io could not be stopped with the VHDX log dirty here")
        with open(vhdx, "rb") as f:
            before = f.read()
        need = required_capacity(TO_RAW, self.tmp, IMG_IMAGE=vhdx, IMG_SOURCE_TYPE="vhdx", IMG_DEST_TYPE="raw")
        back, records = self.convert(TO_RAW, vhdx, "vhdx", "raw", name="back.raw")
        subprocess.run(["cmp", self.disk, back], check=True)
        # The copy and the output, at most: what the runner reserves in the scratch space.
        self.assertGreaterEqual(need, allocated(back) + allocated(vhdx))
        with open(vhdx, "rb") as f:
            self.assertEqual(before, f.read(), "the user's file was changed")
        self.assertIn(f"{vhdx}: the vhdx log was replayed on a copy in the scratch directory",
                      " ".join(status(records, "warn")))
        self.assertEqual(["back.raw", "dirty.vhdx", "work"], sorted(os.listdir(self.tmp)))
        self.assertEqual([], os.listdir(scratch(self.tmp)))  # the copy is gone

    def test_capacity_from_what_is_written(self):
        """qemu maps a VHDX as data from end to end: the estimate comes from the bytes
        the file holds, not the virtual size."""
        big = self.path("big.raw")
        shutil.copyfile(self.disk, big)
        os.truncate(big, 1024 * MiB)
        vhdx = imagebuild.qemu_convert(big, self.path("big.vhdx"), "vhdx")
        os.unlink(big)
        extents = json.loads(imagebuild.sh("qemu-img", "map", "--output=json", vhdx))
        self.assertEqual([(1024 * MiB, True)], [(e["length"], e["data"]) for e in extents])
        need = required_capacity(TO_RAW, self.tmp, IMG_IMAGE=vhdx, IMG_SOURCE_TYPE="vhdx", IMG_DEST_TYPE="raw")
        output, _ = self.convert(TO_RAW, vhdx, "vhdx", "raw")
        self.assertGreaterEqual(need, allocated(output))
        self.assertLess(need, allocated(vhdx) + MiB)
        self.assertLess(need, 64 * MiB)


class TestOptions(ConvertCase):

    def test_a_multi_file_vmdk_output_is_refused_before_writing(self):
        """The runner asks required-capacity before any byte is written."""
        with self.assertRaises(hooks.HookError) as raised:
            required_capacity(FROM_RAW, self.tmp, IMG_IMAGE=self.disk, IMG_SOURCE_TYPE="raw",
                              IMG_DEST_TYPE="vmdk", IMG_VMDK_SUBFORMAT="monolithicFlat")
        # What the runner tells the user: the hook's reason, once, in words.
        code, said = hookrun.said(str(raised.exception))
        self.assertEqual(1, code)
        self.assertIn("IMG_VMDK_SUBFORMAT=monolithicFlat: not a single-file VMDK", said)

    def test_a_bad_size_is_refused(self):
        output, records = self.convert(TO_RAW, self.disk, "raw", "raw", expect=1, IMG_SIZE="lots")
        self.assertIn("IMG_SIZE='lots' is not a size", status(records, "fail")[0])
        self.assertFalse(os.path.exists(output))


class TestBadInput(ConvertCase):
    """Every refusal names the file and the reason, and leaves no output."""

    def refused(self, source, source_type, reason, hook=TO_RAW, dest_type="raw"):
        output, records = self.convert(hook, source, source_type, dest_type, expect=1)
        message = status(records, "bad-input")[0]  # the image's fault: the process exits 3
        self.assertIn(source, message)
        self.assertIn(reason, message)
        self.assertFalse(os.path.exists(output), f"{output} left behind")
        self.assertEqual([], [p for p in os.listdir(self.tmp) if p.startswith("out")])
        self.assertEqual([], os.listdir(scratch(self.tmp)))
        return message

    def vmdk(self):
        return imagebuild.qemu_convert(self.disk, self.path("in.vmdk"), "vmdk", "subformat=streamOptimized")

    def test_type_that_does_not_match_the_content(self):
        qcow2 = imagebuild.qemu_convert(self.disk, self.path("in.qcow2"), "qcow2")
        self.refused(qcow2, "vmdk", "declared as vmdk but the content is qcow2")

    def test_truncated_stream_optimized_vmdk(self):
        source = self.vmdk()
        os.truncate(source, os.path.getsize(source) // 2)
        self.refused(source, "vmdk", "a damaged or truncated image")

    def test_truncated_qcow2(self):
        source = imagebuild.qemu_convert(self.disk, self.path("in.qcow2"), "qcow2")
        os.truncate(source, os.path.getsize(source) // 2)
        self.refused(source, "qcow2", "truncated qcow2 image")

    def test_vmdk_with_an_impossible_grain_size(self):
        source = self.vmdk()
        with open(source, "r+b") as f:
            f.seek(20)   # grainSize, in sectors
            f.write((3).to_bytes(8, "little"))
        self.refused(source, "vmdk", "a damaged or truncated image")

    def test_fuzzed_vmdk(self):
        """Random bytes in the header and grain tables: a clean error naming the file, never a crash."""
        pristine = self.vmdk()
        with open(pristine, "rb") as f:
            original = f.read()
        rng = random.Random(2024)
        failures = 0
        for attempt in range(12):
            data = bytearray(original)
            for _ in range(8):
                data[rng.randrange(0, min(len(data), 64 * 1024))] = rng.randrange(256)
            source = self.path(f"fuzz{attempt}.vmdk")
            with open(source, "wb") as f:
                f.write(data)
            output = self.path("out.raw")
            code, records, text = run_hook(TO_RAW, self.tmp, IMG_IMAGE=source, IMG_SOURCE_TYPE="vmdk",
                                           IMG_DEST_TYPE="raw", IMG_CONVERT_OUTPUT=output)
            self.assertNotIn("Traceback", text)
            if code:
                failures += 1
                self.assertIn(source, status(records, "bad-input")[0])
                self.assertFalse(os.path.exists(output))
            else:
                os.unlink(output)
            os.unlink(source)
        self.assertGreater(failures, 0)

    def test_monolithic_flat_descriptor_is_refused_its_extent_converts_as_raw(self):
        """A two-file VMDK (descriptor + flat extent) names another file: refused,
        with the way out (the flat extent is the raw disk)."""
        flat = self.path("flat.vmdk")
        imagebuild.sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                      self.disk, flat)
        self.assertIn("'flat-flat.vmdk'", self.refused(flat, "vmdk", "give its flat extent file as a raw"))
        back, _ = self.convert(TO_RAW, self.path("flat-flat.vmdk"), "raw", "raw", name="back.raw")
        subprocess.run(["cmp", self.disk, back], check=True)

    def test_vmdk_descriptor_naming_a_host_file(self):
        source = self.path("evil.vmdk")
        with open(source, "w") as f:
            f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\nRW 8 FLAT "/etc/passwd" 0\n\n'
                    'ddb.adapterType = "ide"\n')
        self.refused(source, "vmdk", "names the file '/etc/passwd'; refusing")

    def test_vmdk_descriptor_reaching_out_through_a_symlink(self):
        os.symlink("/etc/passwd", self.path("link-flat.vmdk"))
        source = self.path("link.vmdk")
        with open(source, "w") as f:
            f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\nRW 8 FLAT "link-flat.vmdk" 0\n')
        self.refused(source, "vmdk", "names the file 'link-flat.vmdk'; refusing")

    def test_qcow2_with_a_backing_file(self):
        source = self.path("overlay.qcow2")
        imagebuild.sh("qemu-img", "create", "-f", "qcow2", "-b", self.disk, "-F", "raw", source)
        self.refused(source, "qcow2", "has a backing file")

    def test_vmdk_with_a_parent_disk(self):
        parent = self.path("parent.vmdk")
        imagebuild.sh("qemu-img", "create", "-f", "vmdk", parent, "16M")
        source = self.path("child.vmdk")
        imagebuild.sh("qemu-img", "create", "-f", "vmdk", "-b", parent, "-F", "vmdk", source)
        self.refused(source, "vmdk", "has a backing file")

    def test_qcow2_with_an_external_data_file(self):
        source = self.path("external.qcow2")
        imagebuild.sh("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={self.path('data.bin')}",
                      source, "16M")
        self.refused(source, "qcow2", "external file")

    def test_empty_vhd(self):
        source = self.path("empty.vhd")
        open(source, "w").close()
        self.refused(source, "vhd", "the file is empty")

    def test_truncated_vhd_and_vhdx(self):
        for image_type in ("vhd", "vhdx"):
            source = imagebuild.qemu_convert(self.disk, self.path(f"in.{image_type}"),
                                             qemuimg.DRIVERS[image_type])
            with open(source, "rb") as f:
                head = f.read(os.path.getsize(source) // 2)
            with open(source, "wb") as f:   # a VHD's copy of its footer is at the start
                f.write(head)
            self.assertIn("truncated", self.refused(source, image_type, ""))


class TestInterrupt(ConvertCase):

    def test_sigterm_stops_qemu_img_and_leaves_no_output(self):
        output = self.path("out.vmdk")
        env = hook_env(FROM_RAW, self.tmp, IMG_IMAGE=os.path.join(FIXTURES, "random.raw"), IMG_SOURCE_TYPE="raw",
                       IMG_DEST_TYPE="vmdk", IMG_CONVERT_OUTPUT=output)
        # The hook's own process alone is signalled (the runner would stop its whole group):
        # this is the hook's SIGTERM handling, stopping its qemu-img.
        process = subprocess.Popen([FROM_RAW, "run"], env=env, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:   # wait for the conversion to be under way
            if '"progress"' in line and '"done": 0' not in line:
                break
        self.assertTrue(os.path.exists(output))
        children = subprocess.run(["pgrep", "-P", str(process.pid)], stdout=subprocess.PIPE,
                                  text=True).stdout.split()
        self.assertTrue(children, "no qemu-img running")
        process.send_signal(signal.SIGTERM)
        process.stderr.read()
        self.assertEqual(143, process.wait(timeout=30))
        self.assertFalse(os.path.exists(output))
        time.sleep(0.1)
        for pid in children:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), "qemu-img outlived its hook")
