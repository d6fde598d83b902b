"""imaging_elements.guest.guest: guest paths never leave the image, reads are capped.

The hostile trees here are built to escape: absolute and relative symlinks
out of the root, `..` above it, loops, huge and binary files, FIFOs.  A host
file with known content (a "secret") sits just outside each image root, so an
escape would read it.  The root test mounts a real ext4 image holding the same
links, as the hooks see it.
"""

import errno
import os
import subprocess
import sys

from imaging_elements.sdk import hooklib
from imaging_elements.guest.guest import DEFAULT_LIMIT, MAX_LINKS, Guest, GuestPathError, decode_text, detect_platform
from imaging_elements.sdk.journal import Journal
from tests import base
from tests.imagebuild import MiB, make_fs, write_tree

SECRET = "host secret: this must never be read through a guest path\n"


def hostile_tree(top):
    """top/secret (the host's), top/root (the image) with escapes of every kind."""
    with open(os.path.join(top, "secret"), "w") as f:
        f.write(SECRET)
    os.makedirs(os.path.join(top, "etc"))  # a host /etc beside the image
    with open(os.path.join(top, "etc", "shadow"), "w") as f:
        f.write(SECRET)
    root = os.path.join(top, "root")
    write_tree(root, {
        "etc/shadow": "root:*:19000:0:99999:7:::\n",  # the image's own
        "etc/fstab": ("symlink", "/etc/shadow"),         # absolute: the image's shadow
        "etc/up": ("symlink", "../../secret"),           # relative escape attempt
        "etc/way-up": ("symlink", "../../../../../../../../secret"),
        "etc/abs-host": ("symlink", os.path.join(top, "secret")),  # a host path, taken in-image
        "hostdir": ("symlink", ".."),                      # a directory link above the root
        "loop/a": ("symlink", "b"),
        "loop/b": ("symlink", "a"),
        "loop/self": ("symlink", "self"),
        "loop/dir": ("symlink", "."),
        "lib/modules/6.1/modules.dep": "",
        "lib64": ("symlink", "lib"),
        "usr/lib/os-release": "ID=debian\n",
        "etc/os-release": ("symlink", "../usr/lib/os-release"),
        "sbin/init": ("symlink", "/lib/systemd/systemd"),  # dangling: no systemd in this image
        "text/binary": b"\x00\x01\x02\xff\xfeELF\x00junk\x80\x81",
        "text/utf16": "\ufeffHostname=WIN\r\n".encode("utf-16-le"),
        "text/latin1": "caf\xe9\n".encode("latin-1"),
        "file": "plain\n",
    })
    # A chain of MAX_LINKS + 1 links: one too many for the kernel, and for us.
    for i in range(MAX_LINKS + 1):
        os.symlink(f"c{i + 1}", os.path.join(root, "loop", f"c{i}"))
    with open(os.path.join(root, "loop", f"c{MAX_LINKS + 1}"), "w") as f:
        f.write("end of chain\n")
    return root


class TestResolve(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = hostile_tree(self.tmp)
        self.guest = Guest(self.root)

    def guest_path(self, host):
        return "/" + os.path.relpath(host, os.path.realpath(self.root))

    def test_absolute_symlink_means_the_images_file(self):
        self.assertEqual("root:*:19000:0:99999:7:::\n", self.guest.read_text("/etc/fstab"))
        self.assertEqual("/etc/shadow", self.guest_path(self.guest.resolve("/etc/fstab")))

    def test_relative_escape_stays_at_the_root(self):
        for link in ("/etc/up", "/etc/way-up"):
            error = self.assertRaises(GuestPathError, self.guest.read_text, link)
            self.assertEqual(errno.ENOENT, error.errno)
            self.assertIn(link, str(error))
            # Clamped at the root: the image's /secret, which does not exist.
            self.assertEqual(os.path.join(os.path.realpath(self.root), "secret"),
                             self.guest.resolve(link, must_exist=False))

    def test_host_absolute_path_is_taken_inside_the_image(self):
        # The link names the host's file; in the image that path's first directory is missing.
        first = "/" + self.tmp.lstrip("/").split("/")[0]
        error = self.assertRaises(GuestPathError, self.guest.read_text, "/etc/abs-host")
        self.assertEqual(f"/etc/abs-host: no such file or directory ({first})", str(error))
        os.makedirs(os.path.join(self.root, self.tmp.lstrip("/")))
        expected = os.path.join(os.path.realpath(self.root), self.tmp.lstrip("/"), "secret")
        self.assertEqual(expected, self.guest.resolve("/etc/abs-host", must_exist=False))

    def test_dotdot_never_climbs_above_the_root(self):
        self.assertEqual(os.path.realpath(self.root), self.guest.resolve("/../../.."))
        self.assertEqual("/etc/shadow", self.guest_path(self.guest.resolve("/../../etc/shadow")))
        self.assertEqual("/etc/shadow", self.guest_path(self.guest.resolve("/hostdir/etc/shadow")))
        self.assertEqual("/etc/shadow", self.guest_path(self.guest.resolve("hostdir/hostdir/../etc/shadow")))
        self.assertRaises(GuestPathError, self.guest.read_text, "/hostdir/secret")

    def test_symlink_loops_are_errors(self):
        for path in ("/loop/a", "/loop/self", "/loop/c0"):
            error = self.assertRaises(GuestPathError, self.guest.resolve, path)
            self.assertEqual(errno.ELOOP, error.errno, path)
            self.assertIn("too many levels of symbolic links", str(error))
        # One link fewer than the chain is fine, as in the kernel.
        self.assertEqual("end of chain\n", self.guest.read_text("/loop/c1"))
        # A directory link to itself is not a loop until it is followed too often.
        self.assertEqual("/loop", self.guest_path(self.guest.resolve("/loop/dir/dir/dir")))
        self.assertFalse(self.guest.exists("/loop/a"))

    def test_relative_and_directory_links_resolve_as_in_the_guest(self):
        self.assertEqual("ID=debian\n", self.guest.read_text("/etc/os-release"))
        self.assertTrue(self.guest.isdir("/lib64/modules/6.1"))
        self.assertEqual("/lib/modules/6.1", self.guest_path(self.guest.resolve("/lib64/modules/6.1")))

    def test_follow_false_keeps_the_last_link(self):
        path = self.guest.resolve("/sbin/init", follow=False)
        self.assertTrue(os.path.islink(path))
        self.assertEqual("/lib/systemd/systemd", self.guest.readlink("/sbin/init"))
        error = self.assertRaises(GuestPathError, self.guest.resolve, "/sbin/init")
        self.assertIn("/lib/systemd", str(error))

    def test_not_a_directory(self):
        error = self.assertRaises(GuestPathError, self.guest.resolve, "/file/x")
        self.assertEqual(errno.ENOTDIR, error.errno)

    def test_nul_byte_is_refused(self):
        error = self.assertRaises(GuestPathError, self.guest.resolve, "/etc/fstab\0x")
        self.assertEqual(errno.EINVAL, error.errno)

    def test_nocase_lookup(self):
        write_tree(self.root, {"Windows/System32/config/SOFTWARE": b"regf"})
        windows = Guest(self.root, nocase=True)
        self.assertEqual(b"regf", windows.read_head("/WINDOWS/system32/CONFIG/software", 4))
        self.assertFalse(self.guest.exists("/WINDOWS/system32"))
        self.assertEqual("windows", detect_platform(self.root))

    def test_root_must_be_a_directory(self):
        self.assertRaises(GuestPathError, Guest, os.path.join(self.root, "file"))
        self.assertRaises(ValueError, Guest, "")


class TestRead(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = hostile_tree(self.tmp)
        self.guest = Guest(self.root)

    def test_huge_file_is_refused_without_reading_it(self):
        huge = os.path.join(self.root, "etc", "huge")
        with open(huge, "wb") as f:
            f.truncate(4 << 30)  # sparse: 4 GiB that cost nothing
        error = self.assertRaises(GuestPathError, self.guest.read_bytes, "/etc/huge")
        self.assertEqual(errno.EFBIG, error.errno)
        self.assertIn(f"the limit is {DEFAULT_LIMIT}", str(error))
        self.assertEqual(b"\0" * 16, self.guest.read_head("/etc/huge", 16))
        self.assertEqual(b"plain\n", self.guest.read_bytes("/file", limit=None))

    def test_fifo_is_refused_not_opened_for_blocking(self):
        os.mkfifo(os.path.join(self.root, "etc", "fifo"))
        error = self.assertRaises(GuestPathError, self.guest.read_bytes, "/etc/fifo")
        self.assertIn("not a regular file (a FIFO)", str(error))

    def test_directory_is_refused(self):
        error = self.assertRaises(GuestPathError, self.guest.read_bytes, "/etc")
        self.assertIn("a directory", str(error))

    def test_tolerant_text_decoding(self):
        self.assertEqual("Hostname=WIN\r\n", self.guest.read_text("/text/utf16"))
        self.assertEqual("caf\ufffd\n", self.guest.read_text("/text/latin1"))
        junk = self.guest.read_text("/text/binary")
        self.assertNotIn("\0", junk)
        self.assertIn("junk", junk)
        self.assertEqual("x", decode_text(b"\xef\xbb\xbfx"))

    def test_listdir_and_find(self):
        self.assertIn("fstab", self.guest.listdir("/etc"))
        self.assertEqual([], self.guest.listdir("/no/such/dir"))
        self.assertEqual(["/etc/fstab", "/etc/os-release", "/etc/shadow"],
                         self.guest.find("/etc", lambda n: n != "abs-host"))


class TestCommandLine(base.TestCase):
    """The CLI and its bash twins in lib/img-functions."""

    def setUp(self):
        super().setUp()
        self.root = hostile_tree(self.tmp)
        self.env = dict(os.environ, IMG_MOUNT_POINT=self.root, IMG_LIB=os.path.join(base.ROOT, "lib"),
                        IMG_PYTHON=sys.executable, PYTHONPATH=base.ROOT)

    def bash(self, script):
        return subprocess.run(["bash", "-c", f'source "$IMG_LIB/img-functions"\n{script}'],
                              env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_img_guest_read(self):
        result = self.bash("img_guest_read /etc/fstab")
        self.assertEqual((0, "root:*:19000:0:99999:7:::\n"), (result.returncode, result.stdout))
        result = self.bash("img_guest_read /etc/way-up")
        self.assertEqual(1, result.returncode)
        self.assertNotIn("host secret", result.stdout)
        self.assertIn("guest: /etc/way-up: no such file or directory", result.stderr)

    def test_img_guest_read_limit(self):
        result = self.bash("img_guest_read /file 3")
        self.assertEqual(1, result.returncode)
        self.assertIn("too large to read (6 bytes, the limit is 3)", result.stderr)

    def test_img_guest_path_and_exists(self):
        result = self.bash("img_guest_path /hostdir/hostdir/secret; img_guest_exists /etc/os-release && echo yes;"
                           " img_guest_exists /loop/a || echo no")
        real = os.path.realpath(self.root)
        self.assertEqual(f"{real}/secret\nyes\nno\n", result.stdout, result.stderr)

    def test_platform_and_ls(self):
        result = subprocess.run([sys.executable, "-m", "imaging_elements.guest.guest", "--root", self.root, "platform"],
                                env=self.env, stdout=subprocess.PIPE, text=True)
        self.assertEqual("linux\n", result.stdout)
        result = subprocess.run([sys.executable, "-m", "imaging_elements.guest.guest", "ls", "/lib64/modules"],
                                env=self.env, stdout=subprocess.PIPE, text=True)
        self.assertEqual("6.1\n", result.stdout)


class TestMountedImage(base.TestCase):
    """The same escapes on a real ext4 image, loop-mounted read-only as the mounters do."""

    needs_root = True

    def test_escapes_on_a_mounted_ext4(self):
        os.makedirs(self.path("build"))
        tree = hostile_tree(self.path("build"))
        image = make_fs(self.path("hostile.ext4"), tree, size=16 * MiB, label="rootfs")
        os.environ["IMG_JOURNAL"] = self.path("journal")
        self.addCleanup(os.environ.pop, "IMG_JOURNAL")
        journal = Journal(self.path("journal"))
        self.addCleanup(journal.unwind)
        mnt = self.path("mnt")
        hooklib.mount(hooklib.losetup(image)[0], mnt, "ext4")
        guest = Guest(mnt)
        self.assertEqual("root:*:19000:0:99999:7:::\n", guest.read_text("/etc/fstab"))
        for link in ("/etc/up", "/etc/way-up", "/hostdir/secret", "/hostdir/hostdir/etc/../secret"):
            self.assertRaises(GuestPathError, guest.read_text, link)
        self.assertEqual(errno.ELOOP, self.assertRaises(GuestPathError, guest.read_text, "/loop/c0").errno)
        self.assertEqual("linux", detect_platform(mnt))
        self.assertEqual([], journal.unwind())
