"""Issue 10, the runner's side: what a hostile image (or the code that runs from
it) tries through the runner, and operator mistakes, end to end with the CLI."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import zlib

from imaging_elements.bundle import bundle
from tests import base, imagebuild
from tests.test_runner import BASH, RunnerCase, SandboxTest

MiB = imagebuild.MiB
GiB = 1024 * MiB
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARN|ERROR) ")


def make_keys(directory):
    """user and cloud key pairs: {who: (key, cert)}."""
    keys = {}
    for who in ("user", "cloud"):
        pair = (os.path.join(directory, f"{who}-pk.pem"), os.path.join(directory, f"{who}-cert.pem"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN=test-{who}", "-keyout", pair[0], "-out", pair[1]],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keys[who] = pair
    return keys


def inflating_bundle(directory, keys, size, declared=None, name="bomb.img"):
    """A bundle whose image is `size` bytes of 'A' (not zeros: no holes), gzip'd to about size/1000."""
    os.makedirs(directory)
    info = tarfile.TarInfo(name)
    info.size = size
    compress = zlib.compressobj(4, zlib.DEFLATED, 31)  # 1 GiB -> 1.04 MB, near deflate's best
    sha1, packed = hashlib.sha1(), io.BytesIO()

    def put(data):
        sha1.update(data)
        packed.write(compress.compress(data))

    put(info.tobuf(format=tarfile.GNU_FORMAT))
    block = b"A" * (8 * MiB)
    for _ in range(size // len(block)):
        put(block)
    put(b"A" * (size % len(block)))
    put(bytes(-size % 512) + bytes(1024))
    packed.write(compress.flush())
    secret, iv = os.urandom(16), os.urandom(16)
    encrypted = subprocess.run(["openssl", "enc", "-aes-128-cbc", "-K", secret.hex(), "-iv", iv.hex()],
                               input=packed.getvalue(), stdout=subprocess.PIPE, check=True).stdout
    part = f"{name}.part.0"
    with open(os.path.join(directory, part), "wb") as f:
        f.write(encrypted)
    manifest = bundle.Manifest(name=name, user="1", architecture="x86_64", digest=sha1.hexdigest(),
                               size=declared or size, bundled_size=len(encrypted),
                               parts=[bundle.Part(part, hashlib.sha1(encrypted).hexdigest())])
    data = manifest.seal(secret, iv, bundle.load_private_key(keys["user"][0]),
                         bundle.load_certificate_key(keys["user"][1]),
                         bundle.load_certificate_key(keys["cloud"][1]))
    path = os.path.join(directory, f"{name}.manifest.xml")
    with open(path, "wb") as f:
        f.write(data)
    return path


class PeakBlocks(threading.Thread):
    """Samples the bytes a file holds on disk while a process runs; keeps the peak."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, os.stat(self.path).st_blocks * 512)
            except OSError:
                pass
            time.sleep(0.01)


class ScratchLimitTest(RunnerCase):
    needs_root = True

    def test_bundle_bomb_stops_at_the_limit(self):
        keys = make_keys(self.tmp)
        manifest = inflating_bundle(self.path("bomb"), keys, GiB)
        bundled = sum(os.path.getsize(os.path.join(self.path("bomb"), n)) for n in os.listdir(self.path("bomb")))
        self.assertLess(bundled, 2 * MiB)
        watch = PeakBlocks(os.path.join(self.work, "scratch.ext4"))
        watch.start()
        started = time.monotonic()
        result = self.process("-i", manifest, "-o", self.path("out.raw"), "-T", "raw", "--scratch-limit", "100M",
                              "-e", f"UNBUNDLE_KEY={keys['cloud'][0]}", "bundle-ec2", check=4)
        elapsed = time.monotonic() - started
        watch.stop.set()
        watch.join()
        self.assertIn("the scratch space is full: --scratch-limit of 104857600 bytes reached while writing "
                      "scratch/", result.stderr)
        # The scratch filesystem held at most the limit (plus its own metadata), never the GiB.
        self.assertLess(watch.peak, 105 * MiB)
        self.assertGreater(watch.peak, 50 * MiB)
        self.assertFalse(os.path.exists(self.path("out.raw")))
        self.assertEqual(["journal.jsonl", "lock", "logs", "mnt", "scratch"], sorted(os.listdir(self.work)))
        print(f"\nbundle bomb ({bundled} bytes -> 1 GiB) with --scratch-limit 100M: stopped in {elapsed:.2f} s, "
              f"scratch peak {watch.peak} bytes", file=sys.stderr)

    def test_setup_cost(self):
        self.element("a", {"mount.d/10": BASH + 'df -B1 --output=size "$IMG_SCRATCH_DIR" | tail -1 > ' +
                           self.path("size") + "\n"})
        timings = {}
        for label, extra in (("without", ()), ("with", ("--scratch-limit", "20G"))):
            started = time.monotonic()
            self.process("a", *extra, check=0)
            timings[label] = time.monotonic() - started
        with open(self.path("size")) as f:
            self.assertGreater(int(f.read()), 19 * GiB)
        print(f"\nprocess with --scratch-limit 20G: {timings['with']:.3f} s, without: {timings['without']:.3f} s",
              file=sys.stderr)


class UnbundleTest(RunnerCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        self.keys = make_keys(self.tmp)

    def test_unbundle_through_euca_image_process(self):
        image = self.path("disk.img")
        with open(image, "wb") as f:
            f.write(os.urandom(3 * MiB) + bytes(2 * MiB) + b"end")
        (key, cert), (cloud_key, cloud_cert) = self.keys["user"], self.keys["cloud"]
        self.run_bin("euca-bundle-image", "-i", image, "-r", "x86_64", "-u", "111122223333", "-k", key, "-c", cert,
                     "--ec2cert", cloud_cert, "-d", self.path("b"), check=0)
        out = self.path("back.raw")
        self.process("-i", self.path("b", "disk.img.manifest.xml"), "-o", out, "-T", "raw",
                     "-e", f"UNBUNDLE_KEY={cloud_key}", "bundle-ec2", check=0)
        with open(image, "rb") as a, open(out, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_euca_unbundle_max_size(self):
        manifest = inflating_bundle(self.path("b"), self.keys, 64 * MiB)
        os.mkdir(self.path("out"))
        started = time.monotonic()
        result = self.run_bin("euca-unbundle", "-m", manifest, "-s", self.path("b"), "-d", self.path("out"),
                              "-k", self.keys["cloud"][0], "--max-size", "10M", check=1)
        self.assertIn("the image would be 67108864 bytes, over the limit of 10485760 bytes", result.stderr)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual([], os.listdir(self.path("out")))
        self.run_bin("euca-unbundle", "-m", manifest, "-s", self.path("b"), "-d", self.path("out"),
                     "-k", self.keys["cloud"][0], "--max-size", "abc", check=2)

    def test_data_beyond_the_declared_size_is_never_written(self):
        # The manifest says 1 MiB; the tar member holds 64 MiB: refused before the first byte.
        manifest = inflating_bundle(self.path("b"), self.keys, 64 * MiB, declared=MiB)
        os.mkdir(self.path("out"))
        result = self.run_bin("euca-unbundle", "-m", manifest, "-s", self.path("b"), "-d", self.path("out"),
                              "-k", self.keys["cloud"][0], check=1)
        self.assertIn("the image is 67108864 bytes, the manifest says 1048576", result.stderr)
        self.assertEqual([], os.listdir(self.path("out")))


class StatusChannelTest(RunnerCase):
    """A guest (chroot) hook tries to steer the runner; host hooks are held to the table."""

    needs_root = True

    def guest_image(self):
        root = self.path("root")
        for binary in ("/bin/bash", "/bin/cat"):
            SandboxTest.copy_with_libs(binary, root)
        os.makedirs(os.path.join(root, "etc"))
        with open(os.path.join(root, "etc", "marker"), "w") as f:
            f.write("guest\n")
        return imagebuild.make_fs(self.path("guest.img"), root, size=32 * MiB)

    def test_chroot_hook_cannot_set_image_or_output(self):
        image = self.guest_image()
        victim = self.path("victim")
        with open(victim, "w") as f:
            f.write("host file\n")
        self.element("m", {"mount.d/10-mount": BASH + """
dev=$(losetup --find --show "$IMG_IMAGE")
img_journal_add detach "device=$dev" "backing=$IMG_IMAGE" >/dev/null
img_journal_add umount "path=$IMG_MOUNT_POINT" >/dev/null
mount -o nodev,nosuid "$dev" "$IMG_MOUNT_POINT"
"""})
        self.element("evil", {"install.d/10-steer": "#!/bin/bash\n"
                              'echo \'{"set": {"IMG_IMAGE": "/etc/shadow", "IMG_IMAGE_TYPE": "raw"}}\' '
                              '>&$IMG_STATUS_FD\n'
                              f'echo \'{{"set": {{"IMG_OUTPUT": "{victim}"}}}}\' >&$IMG_STATUS_FD\n'
                              'echo \'{"set": {"IMG_GUEST_SAYS": "x"}}\' >&$IMG_STATUS_FD\n'})
        self.element("c", {"convert.d/10-copy": BASH + 'echo "${IMG_GUEST_SAYS:-}" > ' + self.path("seen") + "\n"
                           'cp --sparse=always "$IMG_IMAGE" "$IMG_CONVERT_OUTPUT"\n'})
        output = self.path("out.img")
        result = self.process("-i", image, "-t", "partition", "-o", output, "m", "evil", "c", check=0)
        self.assertEqual(3, result.stderr.count("runs inside the image and may not set variables"), result.stderr)
        with open(victim) as f:
            self.assertEqual("host file\n", f.read())
        with open(self.path("seen")) as f:
            self.assertEqual("\n", f.read())
        marker = subprocess.run(["debugfs", "-R", "cat /etc/marker", output], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, check=False).stdout
        self.assertEqual("guest\n", marker)

    def test_host_hooks_and_the_table(self):
        self.element("a", {
            "element-options.json": '{"COLOUR": {"type": "string", "description": "a test option"}}',
            "mount.d/10": BASH + "img_set IMG_DISK_TYPE raw\nimg_set IMG_NEW one\nimg_set IMG_COLOUR green\n",
            "validate.d/10": BASH + "img_set IMG_IMAGE /etc/shadow\nimg_set IMG_DISK_TYPE qcow2\n",
            "validate.d/20": BASH + f'echo "$IMG_DISK_TYPE $IMG_NEW $IMG_COLOUR ${{IMG_IMAGE:-none}}" > '
                                    f'{self.path("seen")}\n'})
        result = self.process("a", "-e", "COLOUR=red", check=0)
        with open(self.path("seen")) as f:
            self.assertEqual("raw one red none\n", f.read())
        self.assertIn("validate/10 (a): may not set IMG_IMAGE: the runner's or the operator's setting", result.stderr)
        self.assertIn("may not set IMG_DISK_TYPE", result.stderr)
        self.assertIn("may not set IMG_COLOUR", result.stderr)


class GuestDataTest(RunnerCase):

    def run_measured(self, *args):
        """euca-image-process: (exit code, stderr, its peak RSS in bytes).  The peak is the
        process's own VmHWM, sampled until it exits (rusage would count the forked test runner)."""
        argv = [sys.executable, os.path.join(base.BIN, "euca-image-process"), "--work-dir", self.work,
                "--status-file", self.path("events.jsonl"), "--log-file", self.path("log"), *args]
        peak = 0
        with open(self.path("stderr"), "w") as err:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                       env=dict(os.environ, ELEMENTS_PATH=self.elements, TMPDIR=self.tmp))
            while process.poll() is None:
                try:
                    with open(f"/proc/{process.pid}/status") as f:
                        hwm = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
                except OSError:
                    hwm = None
                if hwm:
                    peak = max(peak, int(hwm.group(1)) * 1024)
                time.sleep(0.01)
        with open(self.path("stderr")) as f:
            return process.returncode, f.read(), peak

    def records(self):
        with open(self.path("events.jsonl")) as f:
            return [json.loads(line) for line in f]

    def test_endless_line_keeps_memory_bounded(self):
        self.element("a", {"mount.d/10-flood": BASH + "head -c 100M /dev/zero | tr '\\0' x\n"
                                                      "head -c 50M /dev/zero | tr '\\0' y >&$IMG_STATUS_FD\n"})
        code, stderr, peak = self.run_measured("a")
        self.assertEqual(0, code, stderr)
        self.assertLess(peak, 64 * MiB)
        self.assertGreater(peak, 0)
        for record in self.records():
            self.assertLess(len(json.dumps(record)), 20000)
        print(f"\n100 MB line + 50 MB status line: runner peak RSS {peak // MiB} MiB", file=sys.stderr)

    def test_floods_are_bounded(self):
        self.element("a", {"mount.d/10-flood": BASH + "seq 30000\n"
                           "{ yes junk | head -n 3000 >&$IMG_STATUS_FD; } || true\n"
                           "{ yes '{\"progress\": {\"done\": 1, \"total\": 2}}' | head -n 100000 "
                           ">&$IMG_STATUS_FD; } || true\n"})
        code, stderr, _ = self.run_measured("a")
        self.assertEqual(0, code, stderr)
        records = self.records()
        logged = [r for r in records if r["event"] == "log" and r["message"].startswith("10-flood: ")]
        warnings = [r["message"] for r in records if r["event"] == "warning"]
        self.assertEqual(10000, len(logged))
        self.assertEqual(102, len(warnings))  # 100 about junk, "more than 100", "more than 10000 lines"
        self.assertIn("mount/10-flood (a): more than 100 warnings; the rest are not shown", warnings)
        self.assertLess(len([r for r in records if r["event"] == "progress"]), 200)

    def test_control_characters_and_forged_lines(self):
        forged = '{"event": "process-end", "result": "ok", "exit_code": 0, "error": null, "duration": 1}'
        self.element("a", {"mount.d/10-forge": BASH +
                           "printf 'title\\x1b]0;pwned\\x07 bell\\a cr\\rover csi\\x9b2J\\n'\n"
                           f"printf 'x\\n{forged}\\n'\n"
                           "printf '2026-01-01 00:00:00 ERROR fake line\\xe2\\x80\\xa8sep\\n'\n"
                           "img_describe \"$(printf 'a\\nb\\x1b[31mred')\"\n"
                           "printf '%s\\n' '{\"warn\": \"w\\u001b[2Jx\\nline2\\r\"}' >&$IMG_STATUS_FD\n"})
        code, stderr, _ = self.run_measured("a")
        self.assertEqual(0, code, stderr)
        with open(self.path("log")) as f:
            log = f.read()
        for text in (stderr, log):
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\r", text)
            self.assertNotIn("\x07", text)
            self.assertNotIn("\u2028", text)
            for line in text.splitlines():
                self.assertRegex(line, STAMP)
        self.assertIn("\\x1b]0;pwned\\x07", stderr)
        records = self.records()
        self.assertEqual(["process-end"], [r["event"] for r in records if r["event"] == "process-end"])
        self.assertEqual("process-end", records[-1]["event"])
        for record in records:
            for value in record.values():
                if isinstance(value, str):
                    self.assertIsNone(re.search("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]", value), value)


class HookTimeoutTest(RunnerCase):

    def test_hook_killed_at_the_limit(self):
        self.element("a", {"mount.d/10-hang": BASH + f"echo $$ > {self.path('pid')}\nsleep 1000\n"})
        started = time.monotonic()
        result = self.process("a", "--hook-timeout", "1", check=1)
        self.assertLess(time.monotonic() - started, 6)
        self.assertIn("mount/10-hang (a) killed: it ran longer than the hook time limit of 1 s", result.stderr)
        with open(self.path("pid")) as f:
            self.assertFalse(os.path.exists(f"/proc/{f.read().strip()}"))
        self.process("a", "--hook-timeout", "soon", check=2)


class OperatorMistakeTest(RunnerCase):
    needs_root = True

    def test_output_is_the_input(self):
        self.element("c", {"convert.d/10": BASH + 'cp "$IMG_IMAGE" "$IMG_CONVERT_OUTPUT"\n' + self.tracer()})
        image = self.path("in.raw")
        with open(image, "wb") as f:
            f.write(b"\x01" * MiB)
        os.symlink(image, self.path("link.raw"))
        os.link(image, self.path("hard.raw"))
        for output in (image, self.path("link.raw"), self.path("hard.raw")):
            result = self.process("-i", image, "-t", "raw", "-o", output, "c", check=2)
            self.assertIn("is the same file as -i/--input", result.stderr)
        result = self.process("-i", image, "-t", "raw", "-o", os.path.join(self.work, "out.raw"), "c", check=2)
        self.assertIn("the output may not be in the work directory", result.stderr)
        self.assertFalse(os.path.exists(self.trace))
        with open(image, "rb") as f:
            self.assertEqual(b"\x01" * MiB, f.read())


class MessagesTest(RunnerCase):

    def test_required_capacity_failure_once_in_words(self):
        self.element("c", {"convert.d/10-x": "#!/usr/bin/env python3\n#@ accepts-source-type: raw\n"
                           "#@ accepts-dest-type: qcow2\n#@ verbs: required-capacity\n"
                           "from imaging_elements.sdk import hooklib\n"
                           "hooklib.main(lambda: None,\n"
                           "             required_capacity=lambda: hooklib.fail('the image is damaged'))\n"})
        image = self.path("in.raw")
        with open(image, "wb") as f:
            f.write(bytes(MiB))
        result = self.process("-i", image, "-t", "raw", "-o", self.path("o.qcow2"), "-T", "qcow2", "c", check=1)
        last = result.stderr.splitlines()[-1]
        self.assertEqual("euca-image-process: error: convert/10-x (c): cannot tell the space it needs: "
                         "the image is damaged", last)
        self.assertNotIn('{"fail"', result.stderr)

    def test_cleanup_says_what_it_released(self):
        from imaging_elements.sdk.journal import Journal
        os.makedirs(self.work)
        leftover = self.path("leftover")
        with open(leftover, "w"):
            pass
        Journal(os.path.join(self.work, "journal.jsonl")).add("remove", path=leftover)
        result = self.run_bin("euca-image-process", "--cleanup", self.work, check=0)
        self.assertIn(f"{self.work}: released 1: remove {leftover}", result.stderr)
        self.assertFalse(os.path.exists(leftover))
        result = self.run_bin("euca-image-process", "--cleanup", self.work, check=0)
        self.assertIn(f"{self.work}: nothing to release", result.stderr)

    def test_bad_input_said_by_a_hook_is_exit_3(self):
        self.element("m", {"mount.d/10-read": BASH + 'echo \'{"bad-input": "the VMDK grain table is damaged"}\' '
                                                     '>&$IMG_STATUS_FD\nexit 1\n'})
        image = self.path("in.raw")
        with open(image, "wb") as f:
            f.write(bytes(MiB))
        result = self.process("-i", image, "-t", "raw", "m", check=3)
        self.assertIn("mount/10-read (m) failed: the VMDK grain table is damaged", result.stderr)


class ReleaseBeforeBootTest(RunnerCase):
    needs_root = True

    def test_mount_released_before_instance_validate(self):
        # --skip-phases convert: the mount must still be gone before instance-validate boots the image.
        self.element("m", {
            "mount.d/10-tmpfs": BASH + 'img_journal_add umount "path=$IMG_MOUNT_POINT" >/dev/null\n'
                                       'mount -t tmpfs -o size=1m none "$IMG_MOUNT_POINT"\n',
            "instance-validate.d/10-v": "#!/bin/bash\n#@ accepts-platform: windows\ntrue\n",
            "cleanup.d/10-look": BASH + f'grep -c " $IMG_MOUNT_POINT " /proc/mounts > {self.path("seen")} || true\n'})
        self.process("--platform", "linux", "--skip-phases", "convert", "m", check=0)
        with open(self.path("seen")) as f:
            self.assertEqual("0\n", f.read())
