"""The install.d sandbox attacked from inside, as a hostile image would.

Every test builds a real ext4 image holding a static busybox (the guest's
/bin/sh), runs `euca-image-process -t partition mounters ATTACK COPY` through
the real CLI, and the install.d hook of ATTACK, run by the image's own shell,
tries one escape.  Each probe prints `PROBE NAME held|escaped ...`; the test
reads those lines from the event stream and checks the host afterwards too.
"""

import hashlib
import json
import os
import pty
import shutil
import stat
import subprocess
import sys

from imaging_elements.engine import config, sandbox
from tests import base, guestimages, imagebuild

SH = "#!/bin/sh\n"
COPY = "#!/bin/bash\ncp --sparse=always \"$IMG_IMAGE\" \"$IMG_CONVERT_OUTPUT\"\n"
BUSYBOX = shutil.which("busybox")
SANDBOX_CAPS = 0xff  # CAP_CHOWN .. CAP_SETUID: sandbox.FILE_CAPS


def probe(name, command):
    """Shell lines: run `command`; success means the guest got through."""
    return f"if {command} >/dev/null 2>&1; then echo PROBE {name} escaped; else echo PROBE {name} held; fi\n"


SECRET_OPTIONS = json.dumps({name: {"type": "string", "description": "a secret for the guest to look for"}
                             for name in ("DB_PASSWORD", "API_TOKEN")})


class HostileGuest(base.TestCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        if not BUSYBOX or "static" not in imagebuild.sh("file", "-L", BUSYBOX):
            self.skipTest("needs a static busybox (Debian package busybox-static)")
        self.elements = self.path("elements")
        self.element("copy", {"convert.d/10-copy": COPY})

    # -- helpers ---------------------------------------------------------------
    def element(self, name, files, mode=0o755):
        for rel, text in files.items():
            full = os.path.join(self.elements, name, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            os.chmod(full, mode)
        with open(os.path.join(self.elements, name, "element-options.json"), "w") as f:
            f.write(SECRET_OPTIONS)  # the secrets the tests hand over with -e
        with open(os.path.join(self.elements, name, "README.md"), "w") as f:
            f.write(f"# {name}: test element\n")

    def guest_tree(self, extra=None):
        """A root with busybox as /bin/sh and its applets, util-linux setpriv, bash, and `extra`
        ({path: function that makes it})."""
        root = self.path("root")
        if os.path.isdir(root):
            return root
        imagebuild.linux_tree(root)  # what the mounters want to see
        os.makedirs(os.path.join(root, "bin"))
        shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
        applets = imagebuild.sh(BUSYBOX, "--list").split()
        for applet in applets:
            if not os.path.exists(os.path.join(root, "bin", applet)):
                os.symlink("busybox", os.path.join(root, "bin", applet))
        for binary in ("/usr/bin/setpriv", "/bin/bash"):
            copy_with_libs(binary, root, "/opt/host" + binary)
        shutil.copy("/bin/bash", os.path.join(root, "bin", "bash"))  # what a break point's shell runs
        for directory in ("proc", "dev", "tmp", "run", "mnt", "etc", "home"):
            os.makedirs(os.path.join(root, directory), exist_ok=True)
        for path, content in (extra or {}).items():
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            content(full)
        return root

    def attack(self, script, *options, header="", tree=None, check=None, timeout=300, mode=0o755):
        """Run `script` as an install.d hook; (CompletedProcess, {probe: [words]}, events)."""
        image = imagebuild.make_fs(self.path("guest.img"), tree or self.guest_tree(), size=64 * imagebuild.MiB)
        self.element("attack", {"install.d/50-attack": SH + header + script}, mode=mode)
        self.output = self.path("out.img")
        result = self.run_bin("euca-image-process", "--status-file", self.path("events.jsonl"),
                              "-i", image, "-t", "partition", "-o", self.output, *options,
                              "mounters", "attack", "copy", env={"ELEMENTS_PATH": self.elements},
                              check=check, timeout=timeout)
        with open(self.path("events.jsonl")) as f:
            events = [json.loads(line) for line in f]
        probes = {}
        for event in events:
            words = event.get("message", "").split()
            if event["event"] == "log" and words[1:2] == ["PROBE"]:
                probes[words[2]] = words[3:]
        return result, probes, events

    def assertHeld(self, probes, *names):
        for name in names:
            self.assertEqual("held", probes.get(name, ["missing"])[0], f"probe {name}: {probes}")

    def failure(self, events):
        return [e for e in events if e["event"] == "hook-end" and e.get("hook") == "50-attack"][-1]

    # -- the attacks -------------------------------------------------------------
    def test_binds_cannot_be_remounted_written_or_unmounted(self):
        package = os.path.join(base.ROOT, "imaging_elements")
        before = digest_tree(package)
        marker = os.path.join(package, "sdk", "escaped-from-sandbox")
        self.addCleanup(lambda: os.path.exists(marker) and os.unlink(marker))
        sdk = "/run/img/python/imaging_elements/sdk"
        script = (probe("remount-python", f"mount -o remount,bind,rw {sdk}")
                  + probe("remount-lib", "mount -o remount,rw /run/img/lib")
                  + probe("remount-hook", "mount -o remount,bind,rw /run/img/hooks/50-attack")
                  + probe("write-python", f"touch {sdk}/escaped-from-sandbox")
                  + probe("write-hooklib", f"sh -c 'echo pwned >> {sdk}/hooklib.py'")
                  + probe("umount-python", f"umount {sdk}")
                  + probe("umount-lazy", "umount -l /run/img/lib")
                  + probe("bind-over", f"mount --bind /tmp {sdk}")
                  # Only the hook SDK is bound in, not the engine or a class library.
                  + probe("see-engine", "test -e /run/img/python/imaging_elements/engine")
                  + probe("see-mount-library", "test -e /run/img/python/imaging_elements/mount")
                  + f"test -f {sdk}/hooklib.py && test -f {sdk}/journal.py && "
                    "test -f /run/img/python/imaging_elements/__init__.py && echo PROBE sdk present\n")
        _, probes, _ = self.attack(script, check=0)
        self.assertHeld(probes, "remount-python", "remount-lib", "remount-hook", "write-python", "write-hooklib",
                        "umount-python", "umount-lazy", "bind-over", "see-engine", "see-mount-library")
        self.assertEqual(["present"], probes.get("sdk"), probes)
        self.assertFalse(os.path.exists(marker))
        self.assertEqual(before, digest_tree(package))

    def test_proc_sys_and_sysrq_are_not_writable(self):
        with open("/proc/sys/kernel/core_pattern") as f:
            core_pattern = f.read()
        # Writing back the same value: harmless if the sandbox fails, but a success is an escape.
        script = ("cat /proc/sys/kernel/core_pattern > /tmp/cp\n"
                  + probe("core-pattern", "sh -c 'cat /tmp/cp > /proc/sys/kernel/core_pattern'")
                  + probe("sysrq", "sh -c 'echo h > /proc/sysrq-trigger'")
                  + probe("sysctl", "sh -c 'cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname'")
                  + probe("remount-proc", "mount -o remount,rw /proc/sys"))
        _, probes, _ = self.attack(script, check=0)
        self.assertHeld(probes, "core-pattern", "sysrq", "sysctl", "remount-proc")
        with open("/proc/sys/kernel/core_pattern") as f:
            self.assertEqual(core_pattern, f.read())

    def test_host_processes_cannot_be_seen_signalled_or_traced(self):
        victim = subprocess.Popen(["sleep", "300"])
        self.addCleanup(victim.wait)
        self.addCleanup(victim.kill)
        script = (probe("see", f"test -e /proc/{victim.pid}")
                  + probe("kill", f"kill -9 {victim.pid}")
                  + probe("kill-all", "sh -c '! kill -0 -1 || test $(ls -d /proc/[0-9]* | wc -l) -gt 20'")
                  + probe("nsenter", "nsenter -t 1 -m -p true"))
        _, probes, _ = self.attack(script, check=0)
        self.assertHeld(probes, "see", "kill", "kill-all", "nsenter")
        self.assertIsNone(victim.poll())

    def test_network_is_loopback_only(self):
        script = ("echo PROBE interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1)\n"
                  + probe("connect", "nc -w 2 1.1.1.1 80 </dev/null")
                  + probe("abstract-socket", "sh -c 'test -n \"$(grep -F @ /proc/net/unix)\"'"))
        _, probes, _ = self.attack(script, check=0)
        self.assertEqual(["lo"], probes["interfaces"])
        self.assertHeld(probes, "connect", "abstract-socket")

    def test_device_nodes_in_the_image_are_unusable(self):
        # A host loop device holding a marker, and nodes for it and /dev/mem shipped in the image.
        disk = self.path("hostdisk")
        with open(disk, "wb") as f:
            f.write(b"HOSTDATA" * 128)
        loop = imagebuild.sh("losetup", "--find", "--show", disk).strip()
        self.addCleanup(imagebuild.sh, "losetup", "-d", loop)
        rdev = os.stat(loop).st_rdev

        def nodes(path):
            os.mknod(path, stat.S_IFBLK | 0o666, rdev)
            os.mknod(path + "-mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
        tree = self.guest_tree({"hostdev/disk": nodes})
        script = (probe("read-block", "sh -c 'head -c 8 /hostdev/disk | grep HOSTDATA'")
                  + probe("open-mem", "head -c 1 /hostdev/disk-mem")
                  + probe("mknod", f"mknod /tmp/disk b {os.major(rdev)} {os.minor(rdev)}")
                  + probe("dev-private", "test -e /dev/loop-control -o -e /dev/sda -o -e /dev/vda"))
        _, probes, _ = self.attack(script, tree=tree, check=0)
        self.assertHeld(probes, "read-block", "open-mem", "mknod", "dev-private")

    def test_no_capabilities_beyond_file_ownership_even_through_setuid(self):
        def setuid_bash(path):
            shutil.copy("/bin/bash", path)
            os.chmod(path, 0o4755)
        tree = self.guest_tree({"opt/suid/bash": setuid_bash})
        drop = "/opt/host/usr/bin/setpriv --reuid=1000 --regid=1000 --clear-groups"
        script = ("echo PROBE root-caps $(grep CapEff /proc/self/status)\n"
                  f"echo PROBE suid $({drop} /opt/suid/bash -p -c 'grep -E \"^(Uid|CapEff)\" /proc/self/status')\n"
                  + probe("sys-admin", "sh -c 'grep CapEff /proc/self/status | grep -v 00000000000000ff'")
                  + probe("chroot", "chroot / true"))
        _, probes, _ = self.attack(script, tree=tree, check=0)
        caps = int(probes["root-caps"][1], 16)
        self.assertEqual(0, caps & ~SANDBOX_CAPS, f"capabilities beyond the file set: {caps:x}")
        self.assertEqual(["Uid:", "1000", "1000", "1000", "1000", "CapEff:", "0000000000000000"], probes["suid"])
        self.assertHeld(probes, "sys-admin", "chroot")

    def test_no_new_user_namespace_to_regain_capabilities(self):
        script = (probe("unshare-r", "unshare -r id")
                  + probe("unshare-user-mount", "unshare -U -m true")
                  + probe("unshare-mount", "unshare -m true")
                  + probe("unshare-net", "unshare -n true")
                  + probe("host-unshare", "/opt/host/usr/bin/setpriv --reuid=0 true && unshare -Urm true"))
        _, probes, _ = self.attack(script, check=0)
        self.assertHeld(probes, "unshare-r", "unshare-user-mount", "unshare-mount", "unshare-net", "host-unshare")

    def test_seccomp_refuses_kernel_attack_surface(self):
        if not shutil.which("gcc") or not os.path.exists("/usr/lib/x86_64-linux-gnu/libc.a"):
            self.skipTest("needs gcc and libc6-dev to build the static probe")

        def build(path):
            imagebuild.sh("gcc", "-static", "-O1", "-o", path, os.path.join(imagebuild.HERE, "images",
                                                                             "syscall-probe.c"))
        tree = self.guest_tree({"opt/syscall-probe": build})
        _, probes, _ = self.attack("/opt/syscall-probe\n", tree=tree, check=0)
        names = ("keyctl", "add_key", "ptrace", "unshare-user", "clone-newuser", "clone3", "setns",
                 "setns-inherited", "io_uring",
                 "bpf", "userfaultfd", "open_tree", "fsopen", "int80")
        self.assertEqual(sorted(names), sorted(probes))
        self.assertHeld(probes, *names)

    def test_nothing_can_be_mounted(self):
        script = (probe("tmpfs", "mount -t tmpfs none /mnt")
                  + probe("proc", "mount -t proc proc /mnt")
                  + probe("bind", "mount --bind /bin /mnt")
                  + probe("sysfs", "mount -t sysfs sysfs /mnt")
                  + probe("pivot", "pivot_root /mnt /mnt"))
        _, probes, _ = self.attack(script, check=0)
        self.assertHeld(probes, "tmpfs", "proc", "bind", "sysfs", "pivot")

    def test_secrets_and_host_paths_reach_the_guest_only_when_declared(self):
        script = ("echo PROBE password ${#IMG_DB_PASSWORD}\necho PROBE token ${#IMG_API_TOKEN}\n"
                  "echo PROBE env $(env | grep -c -e hunter2 -e tok3n)\n"
                  "echo PROBE host-paths $(env | grep -c -e /tmp/ -e euca-image-process)\n")
        options = ("-e", "DB_PASSWORD=hunter2hunter2", "-e", "API_TOKEN=tok3ntok3n")
        _, probes, _ = self.attack(script, *options, check=0)
        self.assertEqual({"password": ["0"], "token": ["0"], "env": ["0"], "host-paths": ["0"]}, probes)
        # Declared by the element: that one secret, and no other, goes in.
        _, probes, _ = self.attack(script, *options, header="#@ needs-secret: DB_PASSWORD\n", check=0)
        self.assertEqual({"password": ["14"], "token": ["0"], "env": ["1"], "host-paths": ["0"]}, probes)

    def test_fork_bomb_is_bounded_and_named(self):
        # The guest's own account of its failure does not hide the bound.
        script = ("echo '{\"fail\": \"all is well\"}' >&$IMG_STATUS_FD\n"
                  "i=0\nwhile [ $i -lt 400 ]; do sleep 100 & i=$((i+1)); done\necho PROBE forks $i\n")
        _, probes, events = self.attack(script, "--sandbox-limit", "processes=64", check=1)
        self.assertNotIn("forks", probes)
        self.assertIn("killed: the sandbox's processes bound (64) was hit", self.failure(events)["reason"])

    def test_memory_hog_is_bounded_and_named(self):
        script = "set -e\ndd if=/dev/zero of=/dev/null bs=400M count=1\necho PROBE hog done\n"
        _, probes, events = self.attack(script, "--sandbox-limit", "memory=128M", check=1)
        self.assertNotIn("hog", probes)
        self.assertIn("killed: the sandbox's memory bound (128 MiB) was hit", self.failure(events)["reason"])

    def test_tmp_and_run_are_size_limited(self):
        script = ("dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null\necho PROBE tmp $(wc -c < /tmp/fill)\n"
                  "dd if=/dev/zero of=/run/fill bs=1M count=64 2>/dev/null\necho PROBE run $(wc -c < /run/fill)\n")
        _, probes, _ = self.attack(script, "--sandbox-limit", "tmpfs=8M", check=0)
        self.assertLessEqual(int(probes["tmp"][0]), 8 * imagebuild.MiB)
        self.assertLessEqual(int(probes["run"][0]), 8 * imagebuild.MiB)

    def test_cpu_time_is_bounded_and_named(self):
        script = "while :; do :; done\n"
        _, _, events = self.attack(script, "--sandbox-limit", "cpu=1", check=1, timeout=120)
        self.assertIn("killed: the sandbox's CPU time bound (1 s) was hit", self.failure(events)["reason"])

    def test_file_size_is_bounded_and_named(self):
        script = "set -e\ndd if=/dev/zero of=/big bs=1M count=32\n"
        _, _, events = self.attack(script, "--sandbox-limit", "file-size=4M", check=1)
        self.assertIn("killed: the sandbox's file size bound (4 MiB) was hit", self.failure(events)["reason"])

    def test_bad_limit_is_refused_before_any_work(self):
        result = self.run_bin("euca-image-process", "-i", "/nonexistent", "--sandbox-limit", "memory=lots",
                              "mounters", env={"ELEMENTS_PATH": self.elements}, check=2)
        self.assertIn("--sandbox-limit: 'memory=lots'", result.stderr)

    def test_a_filesystem_that_cannot_be_idmapped_is_refused(self):
        # ntfs-3g (FUSE) cannot be idmapped: no chroot hook rather than one as host root.
        image = guestimages.make_ntfs(self.path("windows.img"), guestimages.windows_tree(self.path("win")))
        self.element("attack", {"install.d/50-attack": SH + "echo PROBE ran\n"})
        result = self.run_bin("euca-image-process", "-i", image, "-t", "partition", "-o", self.path("out.img"),
                              "mounters", "attack", "copy", env={"ELEMENTS_PATH": self.elements}, check=1)
        self.assertIn("cannot be mapped to the sandbox's unprivileged user", result.stderr)
        self.assertIn("(fuse", result.stderr)
        self.assertNotIn("PROBE ran", result.stderr)

    def test_break_point_shell_is_in_the_same_sandbox(self):
        image = imagebuild.make_fs(self.path("guest.img"), self.guest_tree(), size=64 * imagebuild.MiB)
        self.element("attack", {"install.d/50-attack": SH + "true\n"})
        pid, fd = pty.fork()
        if pid == 0:
            os.environ.update(ELEMENTS_PATH=self.elements, TMPDIR=self.tmp)
            os.execv(sys.executable, [sys.executable, os.path.join(base.BIN, "euca-image-process"),
                                      "-i", image, "-t", "partition", "-o", self.path("out.img"),
                                      "-e", "DB_PASSWORD=hunter2hunter2", "--break", "before-install",
                                      "mounters", "attack", "copy"])
        output = base.read_until(fd, b"before-install] ")
        self.assertIn(b"[euca-image-process before-install]", output)
        os.write(fd, b"mount -o remount,bind,rw /run/img/python/imaging_elements/sdk 2>/dev/null && echo RE''MOUNTED; "
                     b"echo SECRET=${#IMG_DB_PASSWORD} UID=$(id -u) HOST=$(hostname); grep CapEff /proc/self/status; "
                     b"exit 0\n")
        output = base.read_until(fd, None).decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        self.assertEqual(0, os.waitstatus_to_exitcode(status), output)
        self.assertIn("SECRET=0 UID=0 HOST=imaging-sandbox", output)
        self.assertNotIn("REMOUNTED", output)
        self.assertRegex(output, r"CapEff:\s+00000000000000ff")

    def test_the_hook_still_does_its_work(self):
        script = ("set -e\necho hello > /etc/hello\nmkdir -p /home/user\necho mine > /home/user/file\n"
                  "chown 1000:1000 /home/user /home/user/file\nchmod 0640 /home/user/file\n"
                  "cp /bin/busybox /usr-tool\nchmod 4755 /usr-tool\n"
                  "chmod 0 /etc/hello && cat /etc/hello > /dev/null\n"
                  "/opt/host/bin/bash -c 'echo PROBE bash $BASH_VERSION'\n"
                  "echo PROBE whoami $(id -u):$(id -g)\n")
        # A hook only root may read on the host still runs: the guest gets a copy.
        _, probes, _ = self.attack(script, check=0, mode=0o700)
        self.assertEqual(["0:0"], probes["whoami"])
        self.assertIn("bash", probes)
        stats = {path: debugfs_stat(self.output, path) for path in ("/etc/hello", "/home/user/file", "/usr-tool")}
        self.assertEqual((0, 0, 0o100000), stats["/etc/hello"])
        self.assertEqual((1000, 1000, 0o100640), stats["/home/user/file"])
        self.assertEqual((0, 0, 0o104755), stats["/usr-tool"])


class SandboxSettings(base.TestCase):
    """The small functions the runner calls: limits, exit reasons, the secret rule."""

    def test_limits_parse_and_refuse_clearly(self):
        limits = sandbox.parse_limits(["memory=512M,processes=100", "cpu=60", "file-size=1G"])
        self.assertEqual((512 * imagebuild.MiB, 100, 60, 1024 * imagebuild.MiB),
                         (limits["memory"], limits["processes"], limits["cpu"], limits["file_size"]))
        self.assertEqual(sandbox.LIMITS["tmpfs"], sandbox.parse_limits("memory=1G")["tmpfs"])
        for bad, message in (("memory", "use NAME=VALUE"), ("disk=1G", "use NAME=VALUE"),
                             ("processes=-3", "not a positive whole number"), ("tmpfs=0", "not a positive size")):
            with self.assertRaises(ValueError) as caught:
                sandbox.parse_limits([bad])
            self.assertIn(message, str(caught.exception))

    def test_exit_reasons_name_the_bound(self):
        limits = sandbox.parse_limits("memory=256M,processes=50,cpu=9")
        self.assertEqual("killed: the sandbox's memory bound (256 MiB) was hit", sandbox.exit_reason(241, limits))
        self.assertEqual("killed: the sandbox's processes bound (50) was hit", sandbox.exit_reason(242, limits))
        self.assertEqual("killed: the sandbox's CPU time bound (9 s) was hit", sandbox.exit_reason(243, limits))
        self.assertEqual("exit 3", sandbox.exit_reason(3, limits))
        self.assertEqual("exit 240 or more", sandbox.exit_reason(240, limits))

    def test_one_secret_rule(self):
        for name in ("IMG_DB_PASSWORD", "IMG_API_TOKEN", "IMG_CRYPT_PASSPHRASE", "IMG_AWS_SECRET", "IMG_API_KEY",
                     "IMG_CRYPT_KEY_FILE", "img_passwd", "IMG_CREDENTIALS"):
            self.assertTrue(config.is_secret_name(name), name)
        for name in ("IMG_IMAGE", "IMG_PLATFORM", "IMG_SIZE", "IMG_OUTPUT_CRYPT"):
            self.assertFalse(config.is_secret_name(name), name)
        env = sandbox.inside_environment({"IMG_DB_PASSWORD": "x", "IMG_API_TOKEN": "y", "IMG_INPUT": "/srv/u.img",
                                          "IMG_PLATFORM": "linux"}, {"IMG_DB_PASSWORD"})
        self.assertEqual("x", env["IMG_DB_PASSWORD"])
        self.assertNotIn("IMG_API_TOKEN", env)
        self.assertNotIn("IMG_INPUT", env)
        self.assertEqual("linux", env["IMG_PLATFORM"])




def copy_with_libs(binary, root, dest):
    """`binary` at `dest` in `root`, with the shared libraries it needs at their own paths."""
    libs = imagebuild.sh("ldd", binary)
    for path in [part for line in libs.splitlines() for part in line.split() if part.startswith("/")]:
        target = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(path, target)
    target = os.path.join(root, dest.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(binary, target)


def digest_tree(directory):
    digest = hashlib.sha256()
    for parent, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(parent, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def debugfs_stat(image, path):
    """(uid, gid, mode) of `path` in an ext4 image, read with debugfs."""
    out = subprocess.run(["debugfs", "-R", f"stat {path}", image], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, check=True).stdout
    words = out.replace(":", " : ").split()

    def value(key):
        return words[words.index(key) + 2]
    return int(value("User")), int(value("Group")), int(value("Mode"), 8) | 0o100000
