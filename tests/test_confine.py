"""confine.py: what a confined tool can see and do, and the bounds it runs in.
Each property is tried from inside, as a hostile tool would."""

import os
import subprocess

from imaging_elements.engine import confine
from tests import base, imagebuild

MiB = imagebuild.MiB
MARK = b"HOST-SECRET-confine\n"


class TestSandbox(base.TestCase):

    def setUp(self):
        super().setUp()
        self.image = self.path("image.raw")
        with open(self.image, "wb") as f:
            f.write(bytes(MiB))
        self.secret = self.path("secret")
        with open(self.secret, "wb") as f:
            f.write(MARK)

    def test_only_the_given_files_exist_inside(self):
        image = confine.File(self.image, "image")
        script = (f"ls -A / {confine.INSIDE}; cat {self.secret} /etc/shadow; "
                  "cat /proc/self/status; echo x > /usr/x")
        result = confine.run(["sh", "-c", script], [image])
        self.assertIn("No such file", result.stderr)
        self.assertNotIn(MARK.decode().strip(), result.stdout)
        self.assertIn("image\n", result.stdout)
        self.assertIn("CapEff:\t0000000000000000", result.stdout)
        self.assertIn("CapBnd:\t0000000000000000", result.stdout)
        self.assertIn("NoNewPrivs:\t1", result.stdout)
        self.assertIn("Read-only file system", result.stderr)

    def test_no_network(self):
        result = confine.run(["sh", "-c", "cat /proc/net/dev"], [])
        interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines()[2:]]
        self.assertEqual(["lo"], interfaces)

    def test_unprivileged_uid_where_the_files_allow(self):
        """A world-readable input (here in a private directory) and an output we
        create: the tool runs as host uid nobody; the output is given back."""
        os.chmod(self.image, 0o644)
        out = self.path("out")
        open(out, "wb").close()
        files = [confine.File(self.image, "image"), confine.File(out, "out", write=True, created=True)]
        script = f"cat /proc/self/uid_map /proc/self/status; echo hi > {confine.INSIDE}/out"
        result = confine.run(["sh", "-c", script], files)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertRegex(result.stdout, r"Uid:\t65534\t65534\t65534\t65534\n")
        self.assertRegex(result.stdout, r"^\s*0\s+0\s+4294967295\n")  # the host's own user namespace
        with open(out) as f:
            self.assertEqual((0, "hi\n"), (os.stat(out).st_uid, f.read()))
        # A file only root may read: root's uid in a user namespace, without any capability.
        os.chmod(self.secret, 0o600)
        with confine.Sandbox(["sleep", "0"], [confine.File(self.secret, "image")]) as box:
            self.assertFalse(box.as_nobody)
            self.assertIn("--unshare-user", box.argv)
        result = confine.run(["sh", "-c", f"cat {confine.INSIDE}/image; grep CapEff /proc/self/status"],
                             [confine.File(self.secret, "image")])
        self.assertIn("CapEff:\t0000000000000000", result.stdout)

    def test_a_fuse_descriptor_gets_a_regular_file_as_its_name(self):
        """What qemu-storage-daemon is told is its mount point (disk.fuse_export)."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        with confine.Sandbox(["sh", "-c", f"test -f /dev/fd/{read} && ls -l /proc/self/fd/{read}"], [],
                             fd_files=[read]) as box:
            result = subprocess.run(box.argv, pass_fds=box.pass_fds, capture_output=True, text=True,
                                    check=False)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertIn("pipe:", result.stdout)  # the descriptor itself is passed in


class TestLimits(base.TestCase):
    """Each bound stops the tool with a message naming it."""

    def test_cpu_time(self):
        result = confine.run(["sh", "-c", "while :; do :; done"], [], limits=confine.Limits(cpu=1),
                             timeout=30)
        self.assertEqual("it hit the CPU-time limit of 1 s", result.limit_hit)

    def test_wall_clock(self):
        result = confine.run(["sleep", "30"], [], timeout=1)
        self.assertEqual("it ran longer than the time limit of 1 s", result.limit_hit)

    def test_memory(self):
        """A 3 MiB qcow2 of 200 TiB wants large metadata caches: bounded, and said so."""
        path = self.path("big.qcow2")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "qcow2", path, "200T")
        result = confine.run(["qemu-img", "map", "--output=json", f"{confine.INSIDE}/image"],
                             [confine.File(path, "image")], limits=confine.Limits(memory=64 * MiB))
        self.assertNotEqual(0, result.returncode)
        self.assertIn("it hit the memory limit of 64 MiB", result.limit_hit)
        # The default bound is far from what it needs.
        self.assertEqual(0, confine.run(["qemu-img", "map", "--output=json", f"{confine.INSIDE}/image"],
                                        [confine.File(path, "image")]).returncode)

    def test_file_size(self):
        result = confine.run(["sh", "-c", f"head -c 2M /dev/zero > {confine.INSIDE}/out"],
                             [confine.File(self._out(), "out", write=True, created=True)],
                             limits=confine.Limits(file_size=MiB))
        self.assertEqual(f"it hit the file-size limit of {MiB} bytes", result.limit_hit)

    def _out(self):
        path = self.path("out")
        open(path, "wb").close()
        return path

    def test_outputs_are_given_back(self):
        out = self._out()
        result = confine.run(["sh", "-c", f"echo hi > {confine.INSIDE}/out"],
                             [confine.File(out, "out", write=True, created=True)])
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertEqual(0, os.stat(out).st_uid)
        with open(out) as f:
            self.assertEqual("hi\n", f.read())

