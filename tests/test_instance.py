"""Instance validators (imaging_elements.instance and elements/instance-validate-linux).

Real boots under qemu-system-x86_64 (TCG here) of a real Debian 12 disk built
from tests/images/mkdebian (tests.imagebuild.debian_boot_disk: extlinux, cached):
every stock validator passes; a partition (AMI) image booted with -kernel from
the image, without network configuration and with the build host's hostname,
fails with clear messages; a disk with no boot loader and a guest that does
not come up in time end in InstanceError naming the console log (an init that
fails: tests/test_instance_e2e.py).  No boot: the results protocol, the guest
environment, the qemu command line, finding the root and the injection's path
safety.
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import testtools.content

from imaging_elements.engine import hooks as hooks_mod
from imaging_elements.instance import instance
from imaging_elements.sdk.journal import Journal
from tests import base, imagebuild

MiB = imagebuild.MiB
ELEMENT = os.path.join(base.ROOT, "elements", "instance-validate-linux", "instance-validate.d")
FIXTURES = None


def setUpModule():
    global FIXTURES
    FIXTURES = tempfile.mkdtemp(prefix="test-instance-", dir="/var/tmp")


def tearDownModule():
    shutil.rmtree(FIXTURES, ignore_errors=True)


def stock_hooks():
    names = sorted(os.listdir(ELEMENT), key=hooks_mod.sort_key)
    return [(name, os.path.join(ELEMENT, name)) for name in names]


sha256 = functools.partial(base.file_digest, algorithm="sha256")


def edit_fs(image, offset, change):
    """Mount the filesystem at `offset` of `image` (a test's own copy) and call change(root)."""
    loop = imagebuild.sh("losetup", "--find", "--show", "--offset", offset, image).strip()
    try:
        mnt = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(image)))
        imagebuild.sh("mount", loop, mnt)
        try:
            change(mnt)
        finally:
            imagebuild.sh("umount", mnt)
            os.rmdir(mnt)
    finally:
        imagebuild.sh("losetup", "-d", loop)


def copy(image, name):
    target = os.path.join(FIXTURES, name)
    imagebuild.sh("cp", "--sparse=always", image, target)
    return target


def write_hook(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return name, path


class PhaseCase(base.TestCase):
    needs_root = True

    def run_phase(self, image, image_type, hooks, **env):
        """instance.run_phase as the runner calls it; returns (results, status lines)."""
        work = self.path("work")
        for sub in ("scratch", "logs"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        journal = Journal(os.path.join(work, "journal.jsonl"))
        self.addCleanup(journal.unwind)  # a failing test must not leak either
        full = {"IMG_IMAGE": image, "IMG_IMAGE_TYPE": image_type, "IMG_WORK_DIR": work,
                "IMG_SCRATCH_DIR": os.path.join(work, "scratch"), "IMG_PLATFORM": "linux",
                "IMG_JOURNAL": journal.path, "IMG_ELEMENTS": "instance-validate-linux",
                "IMG_SECRET_PASSPHRASE": "never-in-the-guest"}
        full.update(env)
        said = []
        try:
            return instance.run_phase(hooks, full, journal, said.append), said
        finally:
            # Everything the phase made is released by the phase itself.
            self.assertEqual([], journal.pending())
            self.assertEqual([], os.listdir(os.path.join(work, "scratch")))

    def console(self):
        with open(self.path("work", "logs", "instance-console.log"), errors="replace") as f:
            return f.read()


class TestDebianBoots(PhaseCase):

    def test_every_stock_validator_passes(self):
        image = imagebuild.debian_boot_disk()
        before = sha256(image)
        extra = os.path.join(FIXTURES, "extra-hooks")
        os.makedirs(extra, exist_ok=True)
        # Hooks that exercise the protocol inside the guest, after the stock ones.
        own = [
            write_hook(extra, "90-declines", "#!/bin/bash\n#@ verbs: accepts\n"
                       "source \"$IMG_LIB/img-functions\"\n"
                       "if [ \"$IMG_VERB\" = accepts ]; then\n"
                       "  [ -n \"${IMG_INSTANCE:-}\" ] || exit 0\n"
                       "  echo \"no frobnicator in this guest\"; exit 1\nfi\nexit 3\n"),
            write_hook(extra, "91-warns-and-fails", "#!/bin/bash\nsource \"$IMG_LIB/img-functions\"\n"
                       "img_warn \"a warning from $(cat /proc/sys/kernel/hostname)\"\n"
                       "echo some output\n"
                       "[ -z \"${IMG_SECRET_PASSPHRASE:-}\" ] || img_fail \"a secret reached the guest\"\n"
                       "[ ! -e \"${IMG_WORK_DIR:-/nonexistent}\" ] || img_fail \"a host path reached the guest\"\n"
                       "img_fail \"deliberate failure in $IMG_HOOK ($IMG_PHASE)\"\n"),
            write_hook(extra, "92-python", "#!/usr/bin/env python3\n"
                       "from imaging_elements.sdk import hooklib\n"
                       "hooklib.main(lambda: hooklib.describe('python ran'))\n"),
        ]
        started = time.monotonic()
        results, said = self.run_phase(image, "raw", stock_hooks() + own)
        elapsed = time.monotonic() - started
        by_name = {r["hook"]: r for r in results}
        self.assertEqual([n for n, _ in stock_hooks() + own], [r["hook"] for r in results])
        for name, _ in stock_hooks():
            self.assertTrue(by_name[name]["ok"], f"{name}: {by_name[name]}")
            self.assertFalse(by_name[name]["skipped"], name)
        self.assertRegex(by_name["10-multi-user"]["description"],
                         r"^reached (graphical|multi-user)\.target \(multi-user\.target active\)$")
        self.assertIn("mounted read-write", by_name["20-root-rw"]["description"])
        self.assertRegex(by_name["30-network-dhcp"]["description"],
                         r"^ens3 has 10\.0\.2\.15/24 from (a DHCP lease|the lease )")
        self.assertIn("no failed units", by_name["40-no-failed-units"]["description"])
        self.assertRegex(by_name["50-sshd"]["description"], r"port 22 and answers: SSH-2\.0-OpenSSH")
        self.assertIn("hostname imaging-guest", by_name["60-hostname"]["description"])
        self.assertIn(socket.gethostname(), by_name["60-hostname"]["description"])
        self.assertIn("logs root in over SSH", by_name["70-key-injection"]["description"])

        self.assertEqual({"hook": "90-declines", "ok": True, "skipped": True,
                          "description": "not applicable: no frobnicator in this guest"},
                         {k: by_name["90-declines"][k] for k in ("hook", "ok", "skipped", "description")})
        failed = by_name["91-warns-and-fails"]
        self.assertFalse(failed["ok"])
        self.assertEqual("deliberate failure in 91-warns-and-fails (instance-validate.d)", failed["description"])
        self.assertEqual(["a warning from imaging-guest"], failed["warnings"])
        self.assertIn("some output", failed["output"])
        self.assertIn({"warn": "91-warns-and-fails: a warning from imaging-guest"}, said)
        # The Debian guest has no Python: the hook fails, saying why.
        self.assertFalse(by_name["92-python"]["ok"])
        self.assertIn("the guest cannot run the hook", by_name["92-python"]["description"])
        self.assertIn("python3", by_name["92-python"]["description"])

        describes = [m["describe"] for m in said if "describe" in m]
        self.assertTrue(any("through its own boot loader under qemu" in d for d in describes), describes)
        self.assertTrue(any("powered off" in d for d in describes), describes)
        self.assertIn("imaging-guest login", self.console())  # the console log is kept
        self.assertEqual(before, sha256(image), "the image was changed")
        self.addDetail("elapsed", testtools.content.text_content(f"{elapsed:.1f} s"))

    def test_partition_without_network_and_with_the_build_hostname_fails(self):
        image = copy(imagebuild.debian_root_fs(), "no-network.ext4")

        def break_it(root):
            with open(os.path.join(root, "etc", "network", "interfaces"), "w") as f:
                f.write("auto lo\niface lo inet loopback\n")
            with open(os.path.join(root, "etc", "hostname"), "w") as f:
                f.write(socket.gethostname() + "\n")

        edit_fs(image, 0, break_it)
        results, said = self.run_phase(image, "partition", stock_hooks())
        by_name = {r["hook"]: r for r in results}
        self.assertEqual({"30-network-dhcp", "60-hostname"}, {r["hook"] for r in results if not r["ok"]})
        self.assertEqual("no IPv4 address on any interface: the network was not configured at boot "
                         "(interfaces: ens3 (DOWN))", by_name["30-network-dhcp"]["description"])
        host = socket.gethostname()
        self.assertEqual(f"the instance is called {host}, the name of the build host {host}: the image "
                         "carries the hostname of the machine it was made on (/etc/hostname)",
                         by_name["60-hostname"]["description"])
        self.assertIn("the root filesystem (/dev/vda, ext4)", by_name["20-root-rw"]["description"])
        describes = [m["describe"] for m in said if "describe" in m]
        self.assertTrue(any("with -kernel from the image" in d for d in describes), describes)


class TestBootFailures(PhaseCase):

    def test_disk_without_boot_loader(self):
        tree = imagebuild.linux_tree(os.path.join(FIXTURES, "tiny-tree"))
        fs = imagebuild.make_fs(os.path.join(FIXTURES, "tiny.ext4"), tree, size=16 * MiB, label="rootfs")
        image = imagebuild.make_disk(os.path.join(FIXTURES, "tiny.raw"), [{"image": fs, "bootable": True}])
        error = self.assertRaises(instance.InstanceError, self.run_phase, image, "raw", stock_hooks())
        self.assertEqual(f"{image}: the disk cannot boot: its MBR holds no boot code (no BIOS boot "
                         "loader installed)", str(error))
        # The same disk as qcow2: qemu-storage-daemon reads it under the overlay all the same.
        qcow2 = imagebuild.qemu_convert(image, os.path.join(FIXTURES, "tiny.qcow2"), "qcow2")
        error = self.assertRaises(instance.InstanceError, self.run_phase, qcow2, "qcow2", stock_hooks())
        self.assertEqual(f"{qcow2}: the disk cannot boot: its MBR holds no boot code (no BIOS boot "
                         "loader installed)", str(error))

    def test_guest_not_up_in_time(self):
        image = imagebuild.debian_boot_disk()
        started = time.monotonic()
        error = self.assertRaises(instance.InstanceError, self.run_phase, image, "raw", stock_hooks(),
                                  IMG_INSTANCE_TIMEOUT="3")
        self.assertIn(f"{image}: the guest did not come up within IMG_INSTANCE_TIMEOUT=3 s (the validation "
                      "agent never started); console log: " + self.path("work", "logs", "instance-console.log"),
                      str(error))
        self.assertLess(time.monotonic() - started, 60)


class TestRefusals(PhaseCase):
    """Errors before any boot."""

    def test_no_hooks_no_boot(self):
        self.assertEqual([], instance.run_phase([], {}, None, None))

    def test_qcow2_with_a_backing_file_is_refused(self):
        base_image = os.path.join(self.tmp, "secret.raw")
        with open(base_image, "wb") as f:
            f.write(b"host secret".ljust(MiB, b"\0"))
        image = os.path.join(self.tmp, "evil.qcow2")
        imagebuild.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base_image, "-F", "raw", image)
        error = self.assertRaises(instance.InstanceError, self.run_phase, image, "qcow2", stock_hooks())
        self.assertIn(image, str(error))
        self.assertIn("backing file", str(error))

    def test_missing_image_and_unknown_type(self):
        error = self.assertRaises(instance.InstanceError, self.run_phase, self.path("nope.raw"), "raw",
                                  stock_hooks())
        self.assertIn("nope.raw: no image to boot", str(error))
        with open(self.path("x.img"), "wb") as f:
            f.write(b"\0" * 4096)
        error = self.assertRaises(instance.InstanceError, self.run_phase, self.path("x.img"), "bundle",
                                  stock_hooks())
        self.assertIn("cannot boot a bundle image", str(error))

    def test_windows_is_not_booted(self):
        with open(self.path("w.raw"), "wb") as f:
            f.write(b"\0" * 4096)
        error = self.assertRaises(instance.InstanceError, self.run_phase, self.path("w.raw"), "raw",
                                  stock_hooks(), IMG_PLATFORM="windows")
        self.assertIn("Windows guests is not implemented", str(error))

    def test_guest_without_systemd_is_a_mismatch(self):
        tree = imagebuild.linux_tree(os.path.join(self.tmp, "tree"))
        os.unlink(os.path.join(tree, "lib", "systemd", "systemd"))
        with open(os.path.join(tree, "sbin", "init.real"), "w") as f:
            f.write("#!/bin/sh\n")
        os.unlink(os.path.join(tree, "sbin", "init"))
        os.symlink("init.real", os.path.join(tree, "sbin", "init"))
        image = imagebuild.make_fs(self.path("sysv.ext4"), tree, size=16 * MiB)
        results, said = self.run_phase(image, "partition", stock_hooks())
        self.assertTrue(all(r["ok"] and r["skipped"] for r in results))
        self.assertIn("not applicable: the guest has no systemd", results[0]["description"])
        self.assertTrue(any("has no systemd" in m.get("warn", "") for m in said))


class TestFindRoot(base.TestCase):
    """The guest's root in the overlay, without a boot."""

    needs_root = True

    def test_btrfs_root_in_a_subvolume(self):
        image = imagebuild.make_fs(self.path("btrfs.img"), None, fstype="btrfs", size=160 * MiB)
        edit_fs(image, 0, lambda mnt: (imagebuild.sh("btrfs", "-q", "subvolume", "create", os.path.join(mnt, "@")),
                                       imagebuild.linux_tree(os.path.join(mnt, "@"))))
        journal = Journal(self.path("journal.jsonl"))
        self.addCleanup(journal.unwind)
        env = {"IMG_IMAGE": image, "IMG_IMAGE_TYPE": "partition", "IMG_WORK_DIR": self.tmp}
        inst = instance._Instance([("10-a", "/x")], env, journal, lambda message: None)
        inst._check_image()
        inst._prepare_dirs()
        try:
            target, ids = inst._mount_root(image)
            self.assertTrue(os.path.isfile(os.path.join(target, "etc", "fstab")))
            with open("/proc/mounts") as f:
                options = [line.split()[3] for line in f if line.split()[1] == target]
            self.assertEqual(1, len(options))
            self.assertIn("subvol=/@", options[0])
            self.assertIn("nosuid", options[0])
        finally:
            inst._release()
        self.assertEqual([], journal.pending())


class TestKvmProbe(base.TestCase):
    needs_root = True

    def test_probe_answers_quickly(self):
        """Whatever this host's KVM can do, the probe says so within its time and leaves nothing."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.skipTest("no usable /dev/kvm here")
        kernel, _ = imagebuild.debian_kernel_files()
        journal = Journal(self.path("journal.jsonl"))
        started = time.monotonic()
        works, why = instance._probe_kvm(kernel, journal, self.tmp)
        self.assertLess(time.monotonic() - started, instance.KVM_PROBE_TIMEOUT + 6)
        self.assertIsInstance(works, bool)
        self.assertRegex(why, r"^(KVM boots a kernel here|qemu cannot use KVM: |/dev/kvm is there, but)")
        self.assertEqual([], journal.pending())
        self.assertFalse(os.path.exists(self.path("kvm-probe.log")))


class TestWithoutBoot(base.TestCase):
    """The pieces, without qemu."""

    def test_results_protocol(self):
        import base64
        b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
        results = instance.Results("tok", ["10-a", "20-b", "30-c", "40-d", "50-e"], hook_timeout=7)
        two_lines = "line 1\nlast line\n"
        status = "\n".join(json.dumps(m) for m in ({"describe": "one"}, {"warn": "careful"},
                                                    {"describe": "two"}))
        lines = ["noise IMGV tok RESULT 10-a 0", "IMGV other RESULT 10-a 1 - -",
                 "IMGV tok BEGIN", "IMGV tok STATE degraded", "IMGV tok START 10-a",
                 f"IMGV tok RESULT 10-a 0 {b64(status)} {b64('out')}",
                 "IMGV tok START 20-b", f"IMGV tok RESULT 20-b 1  {b64(two_lines)}",
                 "IMGV tok START 30-c", f"IMGV tok SKIP 30-c 1 {b64('not here')}",
                 "IMGV tok START 40-d", "IMGV tok RESULT 40-d 124 ",
                 f"IMGV tok RESULT 99-unknown 0 {b64('x')} ", "IMGV tok DONE"]
        data = ("\r\n".join(lines) + "\r\n").encode()
        for i in range(0, len(data), 7):  # the port delivers bytes in any pieces
            results.feed(data[i:i + 7], 100.0 + i)
        self.assertTrue(results.begun and results.done)
        self.assertEqual("degraded", results.state)
        a, b, c, d, e = results.ordered()
        self.assertEqual((True, "one; two", "out", ["careful"]),
                         (a["ok"], a["description"], a["output"], a["warnings"]))
        self.assertEqual((False, "exit 1: last line"), (b["ok"], b["description"]))
        self.assertEqual((True, True, "not applicable: not here"), (c["ok"], c["skipped"], c["description"]))
        self.assertEqual((False, "did not finish within IMG_INSTANCE_HOOK_TIMEOUT=7 s (stopped)"),
                         (d["ok"], d["description"]))
        self.assertEqual((False, "no result from the guest"), (e["ok"], e["description"]))

    def test_results_from_a_hostile_guest_are_bounded(self):
        import base64
        b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
        results = instance.Results("tok", ["10-a", "20-b"])
        status = "\n".join(json.dumps(m) for m in (
            {"set": {"IMG_OUTPUT": "/etc/passwd"}}, {"frob": 1}, {"describe": "a\x1b[2J\nERROR b"},
            {"progress": {"done": 1, "total": 2}}))
        status += "\n" + "\n".join(json.dumps({"warn": f"w{i}"}) for i in range(50))
        results.feed(b"IMGV tok BEGIN\n" + b"x" * (instance.LINE_LIMIT + 1), 1.0)
        self.assertLessEqual(len(results.buffer), instance.LINE_LIMIT)  # no end in sight: forgotten
        results.feed(b"z" * (instance.LINE_LIMIT + 1), 1.5)  # the same line goes on
        results.feed(b"y" * instance.LINE_LIMIT + b"IMGV tok RESULT 20-b 0 - -\n", 2.0)  # its end
        output = b64("out \x1b]0;t\x07")
        results.feed(f"IMGV tok RESULT 10-a 0 {b64(status)} {output}\nIMGV tok DONE\n".encode(), 3.0)
        self.assertEqual(1, results.dropped)
        a, b = results.ordered()
        self.assertEqual("no result from the guest", b["description"])  # glued to the long line: dropped
        self.assertEqual("a\\x1b[2J\\x0aERROR b", a["description"])
        self.assertEqual("out \\x1b]0;t\\x07", a["output"])
        self.assertEqual(instance.MAX_WARN, len(a["warnings"]))
        refused = [w for w in a["warnings"] if w.startswith("status line refused")]
        self.assertEqual(2, len(refused))
        self.assertIn("IMG_OUTPUT", refused[0])

    def test_what_the_guest_writes_is_bounded(self):
        inst = instance._Instance([("10-a", "/x")], {"IMG_INSTANCE_CONSOLE_LIMIT": "1M",
                                                     "IMG_INSTANCE_OVERLAY_LIMIT": "2M"}, None, None)
        inst.overlay = self.path("overlay.qcow2")
        with open(inst.overlay, "wb") as f:
            f.write(b"x" * (2 * MiB))
        self.assertIsNone(inst._over_bound(instance.RESULTS_LIMIT, MiB))
        self.assertIn("more than 4194304 bytes on the results port", inst._over_bound(instance.RESULTS_LIMIT + 1, 0))
        self.assertIn(f"IMG_INSTANCE_CONSOLE_LIMIT={MiB} bytes", inst._over_bound(0, MiB + 1))
        with open(inst.overlay, "ab") as f:
            f.write(b"x" * 8192)
        self.assertIn(f"IMG_INSTANCE_OVERLAY_LIMIT={2 * MiB} bytes to its disk", inst._over_bound(0, 0))
        # qemu's own hard bound (RLIMIT_FSIZE) is above both.
        self.assertGreater(inst._file_bound(), 2 * MiB)
        self.assertRaises(instance.InstanceError, instance._Instance, [], {"IMG_INSTANCE_OVERLAY_LIMIT": "lots"},
                          None, None)

    def test_guest_environment_has_no_host_paths_or_secrets(self):
        env = instance.guest_environment({
            "IMG_PLATFORM": "linux", "IMG_NAME": "web", "IMG_WORK_DIR": "/var/tmp/w", "IMG_JOURNAL": "/j",
            "IMG_IMAGE": "/x.raw", "IMG_CRYPT_PASSPHRASE": "s3cret", "IMG_API_TOKEN": "t",
            "IMG_MULTI": "a\nb", "PATH": "/host/bin", "HOME": "/root"})
        self.assertEqual("linux", env["IMG_PLATFORM"])
        self.assertEqual("web", env["IMG_NAME"])
        for name in ("IMG_WORK_DIR", "IMG_JOURNAL", "IMG_IMAGE", "IMG_CRYPT_PASSPHRASE", "IMG_API_TOKEN",
                     "IMG_MULTI"):
            self.assertNotIn(name, env)
        self.assertNotIn("/host/bin", env["PATH"])
        self.assertEqual(("1", "3", socket.gethostname()),
                         (env["IMG_INSTANCE"], env["IMG_STATUS_FD"], env["IMG_HOST_HOSTNAME"]))

    def test_fatal_console_lines(self):
        self.assertEqual("the guest kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0)",
                         instance._fatal(instance.FATAL, "[ 1.0] Kernel panic - not syncing: VFS: Unable to "
                                                          "mount root fs on unknown-block(0,0)\n"))
        self.assertEqual("the initramfs did not find the root filesystem /dev/disk/by-uuid/1234",
                         instance._fatal(instance.FATAL, "ALERT!  /dev/disk/by-uuid/1234 does not exist.  "
                                                          "Dropping to a shell!\n"))
        self.assertEqual("the guest dropped to systemd's emergency mode",
                         instance._fatal(instance.FATAL, "You are in emergency mode. After logging in"))
        self.assertIsNone(instance._fatal(instance.FATAL, "[  OK  ] Reached target multi-user.target\n"))

    def test_qemu_command_line(self):
        env = {"IMG_IMAGE": "/images/a.raw", "IMG_IMAGE_TYPE": "partition", "IMG_KERNEL_CMDLINE": "loglevel=7"}
        inst = instance._Instance([("10-a", "/x")], env, None, None)
        inst.fmt, inst.overlay, inst.console, inst.bios_log = "raw", "/w/overlay.qcow2", "/w/c.log", "/w/b.log"
        argv = inst.qemu_argv("tcg", {"kernel": "/w/kernel", "initrd": "/w/initrd"}, "/w/results")
        text = " ".join(argv)
        self.assertIn("-netdev user,id=net0,restrict=on ", text)  # isolated: no router, no host, no forward
        self.assertNotIn("hostfwd", text)
        self.assertIn("-sandbox on,", text)
        base_node = json.loads(argv[argv.index("-blockdev") + 1])
        self.assertEqual((True, True), (base_node["read-only"], base_node["file"]["read-only"]))
        top = json.loads(argv[argv.index("-blockdev", argv.index("-blockdev") + 1) + 1])
        self.assertEqual(("qcow2", "base", "/w/overlay.qcow2"), (top["driver"], top["backing"],
                                                                  top["file"]["filename"]))
        self.assertEqual("root=/dev/vda ro console=ttyS0,115200 panic=-1 quiet loglevel=7",
                         argv[argv.index("-append") + 1])
        self.assertEqual(("/w/kernel", "/w/initrd"), (argv[argv.index("-kernel") + 1], argv[argv.index("-initrd") + 1]))
        self.assertEqual(["tcg", "max"], [argv[argv.index("-accel") + 1], argv[argv.index("-cpu") + 1]])

    def test_accel_choice(self):
        self.assertEqual(("tcg", "IMG_INSTANCE_ACCEL"),
                         instance.choose_accel({"IMG_INSTANCE_ACCEL": "tcg"}, None, None, None))
        self.assertRaises(instance.InstanceError, instance.choose_accel, {"IMG_INSTANCE_ACCEL": "hvf"},
                          None, None, None)

    def test_injection_stays_inside_the_image(self):
        """Symlinks in the guest point into the guest, never to the host."""
        tree = imagebuild.linux_tree(os.path.join(self.tmp, "root"), extra={
            "etc/systemd/system": ("symlink", "/../../../outside-systemd"),
            "root": ("symlink", "/tmp/../../outside-root"),
            "etc/img-instance-validate": ("symlink", "/"),
        })
        outside = [os.path.join(os.path.dirname(self.tmp), n) for n in ("outside-systemd", "outside-root")]
        hook = write_hook(self.tmp, "10-a", "#!/bin/sh\n#@ verbs: accepts\nexit 0\n")
        instance.inject(tree, [hook], {"IMG_PLATFORM": "linux", "IMG_CRYPT_PASSPHRASE": "x"}, "tok", 90, 120)
        for path in outside + ["/outside-systemd", "/outside-root"]:
            self.assertFalse(os.path.exists(path), path)
        unit = os.path.join(tree, "outside-systemd", "img-instance-validate.service")
        self.assertIn("ExecStart=/bin/sh /etc/img-instance-validate/img-agent", open(unit).read())
        self.assertEqual("/etc/systemd/system/img-instance-validate.service", os.readlink(os.path.join(
            tree, "outside-systemd", "multi-user.target.wants", "img-instance-validate.service")))
        keys = os.path.join(tree, "outside-root", ".ssh", "authorized_keys")
        self.assertRegex(open(keys).read(), r"^ssh-ed25519 \S+ euca-image-process-instance-validation\n$")
        agent = os.path.join(tree, "etc", "img-instance-validate")
        self.assertFalse(os.path.islink(agent))  # the guest's own symlink was replaced, not followed
        self.assertEqual("10-a 1\n", open(os.path.join(agent, "hooks.list")).read())
        settings = open(os.path.join(agent, "env.sh")).read()
        self.assertIn("export IMGV_TOKEN=tok\n", settings)
        self.assertNotIn("PASSPHRASE", settings)
        self.assertEqual(0o600, os.stat(os.path.join(agent, "instance-key")).st_mode & 0o777)
        self.assertTrue(os.path.isfile(os.path.join(agent, "lib", "img-functions")))
        self.assertTrue(os.path.isfile(os.path.join(agent, "lib", "imaging_elements", "sdk", "hooklib.py")))
        self.assertTrue(os.path.isfile(os.path.join(agent, "lib", "imaging_elements", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(agent, "lib", "imaging_elements", "engine")))
        # A Python hook's import line works with what the guest gets alone (no site packages).
        ran = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; sys.path.insert(0, sys.argv.pop()); "
                              "from imaging_elements.sdk import hooklib; import imaging_elements; "
                              "print(imaging_elements.__file__); hooklib.main(lambda: hooklib.describe('ran'))",
                              "run", os.path.join(agent, "lib")], capture_output=True, text=True, env={})
        self.assertEqual(0, ran.returncode, ran.stderr)
        self.assertEqual(os.path.join(agent, "lib", "imaging_elements", "__init__.py"), ran.stdout.strip())
        self.assertIn('{"describe": "ran"}', ran.stderr)
        # The agent is the element's own file, copied as it is.
        shipped = os.path.join(base.ROOT, "elements", "instance-validate-linux", "agent", "img-agent")
        self.assertEqual(open(shipped, "rb").read(), open(os.path.join(agent, "img-agent"), "rb").read())
        self.assertEqual([], os.listdir(os.path.join(agent, "secrets")))
