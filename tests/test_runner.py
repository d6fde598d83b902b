"""The runner end to end, through bin/euca-image-process, with real hooks."""

import itertools
import json
import os
import pty
import signal
import subprocess
import sys
import time

from imaging_elements.engine import config
from imaging_elements.sdk.journal import Journal
from tests import base, imagebuild

BASH = "#!/bin/bash\nsource \"$IMG_LIB/img-functions\"\n"
PY = "#!/usr/bin/env python3\nfrom imaging_elements.sdk import hooklib\n"


class RunnerCase(base.TestCase):
    """Builds test elements in a temporary ELEMENTS_PATH and runs the driver on them."""

    def setUp(self):
        super().setUp()
        self.elements = self.path("elements")
        self.work = self.path("work")
        self.trace = self.path("trace")
        os.makedirs(self.elements)

    def element(self, name, files=None, deps=()):
        path = os.path.join(self.elements, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(f"# {name}: test element\n")
        if deps:
            with open(os.path.join(path, "element-deps"), "w") as f:
                f.write("\n".join(deps) + "\n")
        for rel, text in (files or {}).items():
            full = os.path.join(path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            os.chmod(full, 0o755)
        return path

    def process(self, *args, check=None, env=None, keep=True, **kwargs):
        argv = ["--work-dir", self.work] if keep else []
        argv += ["--status-file", self.path("events.jsonl"), *args]
        full_env = {"ELEMENTS_PATH": self.elements}
        full_env.update(env or {})
        return self.run_bin("euca-image-process", *argv, env=full_env, check=check, **kwargs)

    def events(self, name=None):
        with open(self.path("events.jsonl")) as f:
            records = [json.loads(line) for line in f]
        return [r for r in records if name is None or r["event"] == name]

    def traced(self):
        with open(self.trace) as f:
            return f.read().split()

    def tracer(self, label=None):
        return BASH + f'echo "{label or "$IMG_HOOK"}" >> {self.trace}\n'


class OrderTest(RunnerCase):

    def test_global_order_across_elements(self):
        self.element("a", {"mount.d/10-a": self.tracer(), "mount.d/9-a": self.tracer(),
                           "mount.d/zz": self.tracer()}, deps=["b"])
        self.element("b", {"mount.d/10-B": self.tracer(), "mount.d/100-b": self.tracer(),
                           "validate.d/05-v": self.tracer()})
        self.process("a", check=0)
        # numeric prefix as a number, then bytewise ('B' < 'a'), unnumbered last; phases in order.
        self.assertEqual(["9-a", "10-B", "10-a", "100-b", "zz", "05-v"], self.traced())
        ends = self.events("hook-end")
        self.assertEqual(6, len(ends))
        for end in ends:
            self.assertEqual("ok", end["result"])
            self.assertIsInstance(end["duration"], float)

    def test_same_hook_name_in_two_elements(self):
        a = self.element("a", {"mount.d/10-x": self.tracer()})
        b = self.element("b", {"mount.d/10-x": self.tracer()})
        result = self.process("a", "b", check=2)
        self.assertIn(os.path.join(a, "mount.d/10-x"), result.stderr)
        self.assertIn(os.path.join(b, "mount.d/10-x"), result.stderr)
        self.assertFalse(os.path.exists(self.trace))

    def test_files_that_will_not_run_are_reported(self):
        path = self.element("a", {"mount.d/10-ok": self.tracer(), "mount.d/20-backup~": self.tracer(),
                                  "mount.d/30 space": self.tracer()})
        with open(os.path.join(path, "mount.d/15-plain"), "w") as f:
            f.write("#!/bin/bash\n")
        result = self.process("a", check=0)
        self.assertIn("15-plain: not run: not executable", result.stderr)
        self.assertIn("20-backup~: not run", result.stderr)
        self.assertIn("30 space: not run", result.stderr)
        self.assertEqual(["10-ok"], self.traced())
        listing = self.process("a", "--list", check=0)
        self.assertIn("15-plain: not run: not executable", listing.stderr)


class EnvironmentTest(RunnerCase):

    def test_clean_environment_and_environment_d(self):
        self.element("a", {
            "element-options.json": '{"COLOUR": {"type": "string", "description": "a test option"}}',
            "environment.d/10-defaults": "export IMG_COLOUR=${IMG_COLOUR:-blue}\nexport IMG_SHAPE=round\n"
                                         "NOT_EXPORTED_IMG=1\nexport OTHER_VAR=leak\n",
            "environment.d/20-more": "export IMG_DERIVED=\"$IMG_SHAPE-$IMG_COLOUR\"\n",
            "mount.d/10-env": BASH + f"env > {self.path('env.txt')}\n"})
        self.process("a", "-e", "COLOUR=red", check=0,
                     env={"CALLER_SECRET": "hunter2", "IMG_CALLER_THING": "x"})
        with open(self.path("env.txt")) as f:
            env = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
        self.assertEqual("red", env["IMG_COLOUR"])
        self.assertEqual("round-red", env["IMG_DERIVED"])
        self.assertNotIn("OTHER_VAR", env)
        self.assertNotIn("NOT_EXPORTED_IMG", env)
        self.assertNotIn("CALLER_SECRET", env)
        self.assertNotIn("IMG_CALLER_THING", env)
        self.assertTrue(env["PATH"].endswith("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
        for name in ("IMG_WORK_DIR", "IMG_SCRATCH_DIR", "IMG_JOURNAL", "IMG_LIB", "IMG_MOUNT_POINT",
                     "IMG_PHASE", "IMG_HOOK", "IMG_ELEMENT", "IMG_ELEMENTS", "IMG_STATUS_FD"):
            self.assertIn(name, env)
        self.assertEqual("mount", env["IMG_PHASE"])

    def test_environment_d_error_names_the_file(self):
        path = self.element("a", {"environment.d/10-bad": "false\n", "mount.d/10": self.tracer()})
        result = self.process("a", check=2)
        self.assertIn(os.path.join(path, "environment.d/10-bad") + ": failed", result.stderr)

    def test_set_changes_context_for_later_hooks(self):
        self.element("a", {
            "mount.d/10-export": BASH + "img_set IMG_DISK_TYPE raw\n",
            "mount.d/20-raw-only": "#!/bin/bash\n#@ accepts-disk-type: raw\n" + f"echo raw >> {self.trace}\n",
            "mount.d/30-py": PY + "import os\n"
                                  "hooklib.main(lambda: open(%r, 'a').write(os.environ['IMG_DISK_TYPE'] + '\\n'))\n"
                             % self.trace})
        self.process("a", check=0)
        self.assertEqual(["raw", "raw"], self.traced())


class HeaderTest(RunnerCase):

    def test_unknown_header_key(self):
        path = self.element("a", {"mount.d/10-x": "#!/bin/bash\n#@ acepts-disk-type: raw\n"})
        result = self.process("a", check=2)
        self.assertIn(os.path.join(path, "mount.d/10-x") + ":2: unknown header", result.stderr)

    def test_accepts_static_requires_and_dynamic(self):
        self.element("a", {
            "mount.d/10-needs-tool": "#!/bin/bash\n#@ requires: no-such-tool-here\n" + f"echo bad >> {self.trace}\n",
            "mount.d/20-vmdk-only": "#!/bin/bash\n#@ accepts-disk-type: vmdk qcow2\n" + f"echo bad >> {self.trace}\n",
            "mount.d/30-dynamic-no": BASH + "#@ verbs: accepts\n"
                                     'if [ "$IMG_VERB" = accepts ]; then echo "not today"; exit 1; fi\n'
                                     f"echo bad >> {self.trace}\n",
            "mount.d/40-dynamic-crash": "#!/bin/bash\n#@ verbs: accepts\n"
                                        '[ "$1" = accepts ] && kill -SEGV $$\n' + f"echo bad >> {self.trace}\n",
            "mount.d/50-dynamic-yes": "#!/bin/bash\n#@ verbs: accepts\n"
                                      '[ "$1" = accepts ] && exit 0\n' + f"echo good >> {self.trace}\n",
        })
        self.process("a", "-i", self.raw_disk(), check=0)
        self.assertEqual(["good"], self.traced())
        answers = {e["hook"]: e for e in self.events("accepts")}
        self.assertEqual("needs no-such-tool-here, not found on PATH", answers["10-needs-tool"]["reason"])
        self.assertIn("disk-type raw is not one of: vmdk qcow2", answers["20-vmdk-only"]["reason"])
        self.assertEqual("not today", answers["30-dynamic-no"]["reason"])
        self.assertIn("accepts failed", answers["40-dynamic-crash"]["reason"])
        listing = self.process("a", "-i", self.raw_disk(), "--list", check=0).stdout
        self.assertIn("no: needs no-such-tool-here, not found on PATH", listing)
        self.assertIn("no: not today", listing)
        self.assertRegex(listing, r"50-dynamic-yes\s+a\s+accepts: yes")

    def raw_disk(self):
        path = self.path("disk.raw")
        if not os.path.exists(path):
            imagebuild.make_disk(path, [{"size": imagebuild.MiB}])
        return path


class ValidatorTest(RunnerCase):

    def test_optional_failure_warns_required_failure_fails(self):
        self.element("v", {
            "validate.d/10-good": BASH + "img_describe 'checked the good thing'\n",
            "validate.d/20-optional": BASH + "#@ optional: yes\nimg_fail 'no serial console'\n",
            "validate.d/30-required": BASH + "img_fail 'Expected RHEL/CentOS 5.x/6.x, "
                                             "but failed to find /etc/redhat-release'\n",
            "validate.d/40-later": self.tracer(),
            "validate.d/50-also-bad": BASH + "img_fail 'second problem'\n"})
        result = self.process("v", check=1)
        self.assertIn("2 validators failed: validate/30-required (v) failed: Expected RHEL/CentOS 5.x/6.x",
                      result.stderr)
        self.assertIn("validate/50-also-bad (v) failed: second problem", result.stderr)
        results = {e["hook"]: e for e in self.events("hook-end")}
        self.assertEqual("checked the good thing", results["10-good"]["description"])
        self.assertEqual("warning", results["20-optional"]["result"])
        self.assertEqual("no serial console", results["20-optional"]["reason"])
        self.assertEqual("failed", results["30-required"]["result"])
        # Every validator ran, also after the first failure.
        self.assertEqual(["40-later"], self.traced())

    def test_failure_reason_from_output_tail(self):
        self.element("v", {"validate.d/10": "#!/bin/bash\necho first\necho 'the reason' >&2\nexit 3\n"})
        result = self.process("v", check=1)
        self.assertIn("exit 3: first | the reason", result.stderr)


class ResourceTest(RunnerCase):
    """Resources made by hooks are released whatever happens."""

    needs_root = True

    def fs_image(self):
        tree = imagebuild.write_tree(self.path("tree"), {"etc/hostname": "x\n"})
        return imagebuild.make_fs(self.path("fs.img"), tree, size=16 * imagebuild.MiB)

    def mounting_element(self, then=""):
        return self.element("m", {"mount.d/10-mount": BASH + f"""
dev=$(img_losetup "$IMG_INPUT")
img_mount "$dev" "$IMG_MOUNT_POINT" ext4
echo "$dev" > {self.path('dev')}
img_journal_add run false >/dev/null   # an undo step that fails
{then}
"""})

    def test_failure_unwinds_everything_and_keeps_exit_code(self):
        self.mounting_element()
        self.element("f", {"validate.d/10-fail": BASH + "img_fail 'broken on purpose'\n"})
        result = self.process("-i", self.fs_image(), "m", "f", check=1)
        self.assertIn("broken on purpose", result.stderr)
        self.assertIn("cleanup run false failed", result.stderr)
        self.assertEqual([], Journal(os.path.join(self.work, "journal.jsonl")).pending()[1:])

    def test_failing_cleanup_step_alone_gives_exit_5(self):
        self.mounting_element()
        result = self.process("-i", self.fs_image(), "m", check=5)
        self.assertIn("cleanup run false failed", result.stderr)

    def test_mount_is_released_before_convert(self):
        self.mounting_element()
        self.element("c", {"convert.d/10-copy": BASH + "#@ accepts-source-type: partition\n"
                           f"grep -c \"$IMG_MOUNT_POINT\" /proc/mounts > {self.path('mounted')} || true\n"
                           'cp --sparse=always "$IMG_IMAGE" "$IMG_CONVERT_OUTPUT"\n'})
        self.process("-i", self.fs_image(), "-o", self.path("out.img"), "m", "c", check=5)
        with open(self.path("mounted")) as f:
            self.assertEqual("0", f.read().strip())
        subprocess.run(["cmp", self.path("fs.img"), self.path("out.img")], check=True)

    def wait_for(self, path, timeout=20):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                self.fail(f"{path} never appeared")
            time.sleep(0.05)

    def start(self, *args):
        env = dict(os.environ, ELEMENTS_PATH=self.elements, TMPDIR=self.tmp)
        return subprocess.Popen([sys.executable, os.path.join(base.BIN, "euca-image-process"),
                                 "--work-dir", self.work, *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_sigterm_unwinds(self):
        self.mounting_element(then=f"touch {self.path('ready')}; sleep 60")
        process = self.start("-i", self.fs_image(), "m")
        self.wait_for(self.path("ready"))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        self.assertEqual(143, process.returncode, stderr)
        self.assertIn("terminated by SIGTERM", stderr)

    def test_sigkill_then_cleanup(self):
        self.mounting_element(then=f"touch {self.path('ready')}; sleep 60")
        process = self.start("-i", self.fs_image(), "m")
        self.wait_for(self.path("ready"))
        process.kill()
        process.communicate(timeout=30)
        with open(self.path("dev")) as f:
            device = f.read().strip()
        self.assertIn(device, subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout)
        again = self.run_bin("euca-image-process", "--work-dir", self.work, "m",
                             env={"ELEMENTS_PATH": self.elements}, check=2)
        self.assertIn("--cleanup", again.stderr)
        result = self.run_bin("euca-image-process", "--cleanup", self.work, check=5)
        self.assertIn("cleanup run false failed", result.stderr)
        # (By file: a parallel test may already have the same device number.)
        self.assertNotIn(self.path("fs.img"), subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE,
                                                             text=True).stdout)
        sleepers = subprocess.run(["pgrep", "-f", "sleep 60"], stdout=subprocess.PIPE, text=True).stdout.split()
        hook_pids = [p for p in sleepers
                     if self.tmp in open(f"/proc/{p}/environ", "rb").read().decode(errors="replace")]
        self.assertEqual([], hook_pids)


class SandboxTest(RunnerCase):
    """install.d hooks run inside the mounted image, in a sandbox without network."""

    needs_root = True

    def test_install_hook_runs_sandboxed_in_the_image(self):
        root = self.path("root")
        # A tiny guest: bash and the libraries it needs, copied from the host.
        for binary in ("/bin/bash", "/bin/cat", "/bin/hostname", "/bin/ls", "/usr/bin/tail", "/usr/bin/cut"):
            self.copy_with_libs(binary, root)
        image = imagebuild.make_fs(self.path("guest.img"), root, size=64 * imagebuild.MiB)
        self.element("m", {"mount.d/10-mount": BASH + """
dev=$(losetup --find --show "$IMG_IMAGE")
img_journal_add detach "device=$dev" "backing=$IMG_IMAGE" >/dev/null
mkdir -p "$IMG_MOUNT_POINT"
img_journal_add umount "path=$IMG_MOUNT_POINT" >/dev/null
mount -o nodev,nosuid "$dev" "$IMG_MOUNT_POINT"
"""})
        self.element("i", {"install.d/10-inside": "#!/bin/bash\nset -e\nsource \"$IMG_LIB/img-functions\"\n"
                           "{ hostname; cat /proc/net/dev | tail -n +3 | cut -d: -f1; ls /work 2>&1 || true; "
                           "echo \"mount=$IMG_MOUNT_POINT\"; } > /inside.txt\n"
                           "img_describe 'wrote /inside.txt'\n"})
        self.element("c", {"convert.d/10-copy": BASH + 'cp --sparse=always "$IMG_IMAGE" "$IMG_CONVERT_OUTPUT"\n'})
        output = self.path("out.img")
        self.process("-i", image, "-t", "partition", "-o", output, "m", "i", "c", check=0)
        # The hook wrote into a working copy, which became the output; the input is untouched.
        untouched = subprocess.run(["debugfs", "-R", "stat /inside.txt", image], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True).stdout
        self.assertIn("File not found", untouched)
        out = subprocess.run(["debugfs", "-R", "cat /inside.txt", output], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout.split()
        self.assertEqual("imaging-sandbox", out[0])
        self.assertEqual(["lo"], [x for x in out[1:] if not x.startswith(("ls:", "/work", "cannot", "No", "such",
                                                                          "access", "'/work':", "file",
                                                                          "or", "directory", "mount="))])
        self.assertIn("mount=/", out)
        self.assertIn("wrote /inside.txt", [e.get("description") for e in self.events("hook-end")])

    @staticmethod
    def copy_with_libs(binary, root):
        libs = subprocess.run(["ldd", binary], stdout=subprocess.PIPE, text=True).stdout
        paths = [binary] + [part for line in libs.splitlines() for part in line.split()
                            if part.startswith("/")]
        for path in paths:
            dest = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            subprocess.run(["cp", "-L", path, dest], check=True)
        for directory in ("proc", "dev", "tmp", "run"):
            os.makedirs(os.path.join(root, directory), exist_ok=True)


class ConvertChainTest(RunnerCase):
    """Converter planning, capacity checks and atomic output, with qemu-img doing the work."""

    def setUp(self):
        super().setUp()
        self.disk = imagebuild.make_disk(self.path("disk.raw"), [{"size": 4 * imagebuild.MiB}])
        with open(self.disk, "r+b") as f:
            f.seek(2 * imagebuild.MiB)
            f.write(b"payload" * 1000)
        qemu = BASH + ('qemu-img convert -f "$(echo $IMG_SOURCE_TYPE)" -O "$IMG_DEST_TYPE" '
                       '"$IMG_IMAGE" "$IMG_CONVERT_OUTPUT"\nimg_progress 1 1\n')
        self.element("to-qcow2", {
            "element-options.json": '{"NEED": {"type": "int", "description": "a test option"}}',
            "convert.d/10-raw-qcow2": BASH.replace(
            "\n", "\n#@ accepts-source-type: raw\n#@ accepts-dest-type: qcow2\n#@ verbs: required-capacity\n", 1)
            + '[ "$IMG_VERB" = required-capacity ] && { echo "${IMG_NEED:-1000}"; exit 0; }\n'
            + qemu.split("\n", 2)[2]})
        self.element("to-vmdk", {"convert.d/20-qcow2-vmdk": BASH.replace(
            "\n", "\n#@ accepts-source-type: qcow2\n#@ accepts-dest-type: vmdk\n", 1) + qemu.split("\n", 2)[2]})
        self.element("broken", {"convert.d/20-qcow2-vmdk-broken":
                                "#!/bin/bash\n#@ accepts-source-type: qcow2\n#@ accepts-dest-type: vmdk\n"
                                'echo half > "$IMG_CONVERT_OUTPUT"\nexit 1\n'})

    def test_chain_through_an_intermediate_type(self):
        out = self.path("out.vmdk")
        self.process("-i", self.disk, "-o", out, "-T", "vmdk", "to-qcow2", "to-vmdk", check=0)
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", self.disk, out], check=True,
                       stdout=subprocess.DEVNULL)
        steps = [e["hook"] for e in self.events("hook-end")]
        self.assertEqual(["10-raw-qcow2", "20-qcow2-vmdk"], steps)
        self.assertTrue(self.events("progress"))
        self.assertEqual([], os.listdir(os.path.join(self.work, "scratch")))
        listing = self.process("-i", self.disk, "-o", out, "-T", "vmdk", "to-qcow2", "to-vmdk", "--list").stdout
        self.assertIn("plan: raw -> [10-raw-qcow2] qcow2 -> [20-qcow2-vmdk] vmdk", listing)

    def test_no_chain_possible(self):
        result = self.process("-i", self.disk, "-o", self.path("o"), "-T", "vhdx", "to-qcow2", check=2)
        self.assertIn("no hook of the elements (to-qcow2) converts raw to vhdx", result.stderr)

    def test_capacity_is_checked_before_any_byte(self):
        out = self.path("out.vmdk")
        result = self.process("-i", self.disk, "-o", out, "-T", "vmdk", "--scratch-limit", "10M",
                              "-e", f"NEED={50 * imagebuild.MiB}", "to-qcow2", "to-vmdk", check=4)
        self.assertIn(f"needs {50 * imagebuild.MiB} bytes", result.stderr)
        self.assertIn("left of --scratch-limit", result.stderr)
        self.assertEqual([], [e for e in self.events("hook-start")])
        self.assertFalse(os.path.exists(out))

    def test_failed_step_leaves_nothing(self):
        out = self.path("out.vmdk")
        result = self.process("-i", self.disk, "-o", out, "-T", "vmdk", "to-qcow2", "broken", check=1)
        self.assertIn("20-qcow2-vmdk-broken", result.stderr)
        self.assertEqual(["disk.raw", "elements", "events.jsonl", "work"], sorted(os.listdir(self.tmp)))
        self.assertEqual([], os.listdir(os.path.join(self.work, "scratch")))

    def test_type_mismatch_and_missing_input(self):
        result = self.process("-i", self.disk, "-t", "qcow2", "to-qcow2", check=3)
        self.assertIn(f"{self.disk}: declared as qcow2 but the content is raw", result.stderr)
        result = self.process("-i", self.path("nope"), "to-qcow2", check=3)
        self.assertIn(self.path("nope") + ": no such file", result.stderr)
        result = self.process("-i", self.disk, "-o", "/nonexistent/dir/x", "to-qcow2", check=3)
        self.assertIn("output directory /nonexistent/dir does not exist", result.stderr)


class PartialTest(RunnerCase):

    def setUp(self):
        super().setUp()
        self.element("a", {"mount.d/10-m": self.tracer(), "validate.d/10-v": self.tracer(),
                           "validate.d/20-w": self.tracer(), "cleanup.d/10-c": self.tracer()})

    def test_phases_skip_and_single_hook(self):
        self.process("a", "--phases", "validate", check=0)
        self.assertEqual(["10-v", "20-w"], self.traced())
        os.unlink(self.trace)
        self.process("a", "--skip-phases", "validate,cleanup", check=0)
        self.assertEqual(["10-m"], self.traced())
        os.unlink(self.trace)
        self.process("a", "--phases", "validate", "--hook", "validate/20-w", check=0)
        self.assertEqual(["20-w"], self.traced())

    def test_cleanup_phase_runs_after_failure(self):
        self.element("b", {"validate.d/15-fail": "#!/bin/bash\nexit 1\n"})
        self.process("a", "b", check=1)
        self.assertEqual(["10-m", "10-v", "20-w", "10-c"], self.traced())

    def test_list_runs_nothing(self):
        out = self.process("a", "--list", check=0).stdout
        self.assertFalse(os.path.exists(self.trace))
        self.assertLess(out.index("10-m"), out.index("10-v"))
        self.assertLess(out.index("10-v"), out.index("20-w"))

    def test_unknown_phase(self):
        result = self.process("a", "--phases", "mount,frobnicate", check=2)
        self.assertIn("unknown phase frobnicate", result.stderr)


class BreakTest(RunnerCase):

    def setUp(self):
        super().setUp()
        self.element("a", {"mount.d/10-m": self.tracer(), "validate.d/10-v": self.tracer()})

    def test_no_terminal_fails_clearly(self):
        result = self.process("a", "--break", "after-mount", check=2, stdin=subprocess.DEVNULL)
        self.assertIn("break point after-mount: no terminal attached", result.stderr)
        result = self.process("a", check=2, env={"break": "before-validate"}, stdin=subprocess.DEVNULL)
        self.assertIn("break point before-validate: no terminal", result.stderr)
        result = self.process("a", "--break", "before-nothing", check=2)
        self.assertIn("break point 'before-nothing'", result.stderr)

    def test_shell_on_a_terminal(self):
        pid, fd = pty.fork()
        if pid == 0:
            os.environ.update(ELEMENTS_PATH=self.elements, TMPDIR=self.tmp)
            os.execv(sys.executable, [sys.executable, os.path.join(base.BIN, "euca-image-process"),
                                      "--work-dir", self.work, "--break", "after-mount", "a"])
        output = base.read_until(fd, b"after-mount] ")
        self.assertIn(b"[euca-image-process after-mount]", output)
        os.write(fd, b'echo "phase=$IMG_PHASE hook-env=${IMG_WORK_DIR:+yes}"; exit 0\n')
        output = base.read_until(fd, None)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(0, os.waitstatus_to_exitcode(status), output)
        self.assertIn(b"hook-env=yes", output)
        self.assertEqual(["10-m", "10-v"], self.traced())



class ConfigTest(base.TestCase):

    def test_docs_match_the_table(self):
        with open(os.path.join(base.ROOT, "docs", "configuration.md")) as f:
            self.assertEqual(config.markdown(), f.read(),
                             "regenerate: python -m imaging_elements.engine.config > docs/configuration.md")

    def test_help_comes_from_the_table(self):
        out = self.run_bin("euca-image-process", "--help", check=0).stdout
        for setting in config.SETTINGS:
            self.assertIn(setting.flags[-1], out)
            if setting.env:
                self.assertIn(setting.env, out)
        self.assertIn("exit codes:", out)

    def test_plain_command_lines_read_as_argparse_reads_them(self):
        # parse_plain spares a process argparse; where it answers, it answers as argparse
        # does, and it leaves every other form (help, abbreviations, mistakes) to argparse.
        pieces = [["-q"], ["--quiet"], ["a"], ["b", "c"], ["--work-dir", "w"], ["--work-dir=w"], ["-i", "x.img"],
                  ["-e", "A=1"], ["--env=C=3"], ["--list"], ["--sandbox-limit", "memory=1G"], ["--work", "w"],
                  ["-qi", "x"], ["--", "a"], ["-i", "-x"], ["--quiet=1"], ["-i=x"], ["-ix"], [""], ["-h"],
                  ["--work-dir"], ["-"], ["-1"], ["--platform", "linux"]]
        parser = config.parser()
        answered = 0
        for count in (1, 2, 3):
            for combination in itertools.permutations(pieces, count):
                argv = [arg for piece in combination for arg in piece]
                plain = config.parse_plain(argv)
                if plain is None:
                    continue
                answered += 1
                self.assertEqual(vars(parser.parse_args(argv)), vars(plain), argv)
        self.assertGreater(answered, 1000)
        for argv in (["-h"], ["--work", "w", "a"], ["a", "-q", "b"], ["-i", "-x", "a"], ["--quiet=1"]):
            self.assertIsNone(config.parse_plain(argv), argv)
        self.assertEqual(["hooks1"], config.parse_plain(["-q", "--work-dir", "w", "hooks1"]).elements)

    def test_option_beats_environment(self):
        args = config.parse(["--platform", "linux", "x"], {"IMG_PLATFORM": "windows", "IMG_SIZE": "4G"})
        self.assertEqual("linux", args.platform)
        self.assertEqual("4G", args.size)
        self.assertEqual("none", args.output_crypt)
        self.assertEqual(10 * 1024 ** 3, config.parse_size("10G"))
        self.assertRaises(ValueError, config.parse_size, "ten")


class StatusTest(RunnerCase):

    def test_status_fd_stream_and_secrets(self):
        self.element("a", {"element-options.json":
                           '{"VAULT_PASSPHRASE": {"type": "string", "description": "a test option"}}',
                           "mount.d/10-m": BASH + 'echo "using $IMG_VAULT_PASSPHRASE"\n'
                                                  "img_progress 50 100\nimg_progress 100 100\n"
                                                  'img_describe "done with $IMG_VAULT_PASSPHRASE"\n'})
        read, write = os.pipe()
        env = dict(os.environ, ELEMENTS_PATH=self.elements, TMPDIR=self.tmp)
        process = subprocess.Popen([sys.executable, os.path.join(base.BIN, "euca-image-process"),
                                    "--status-fd", str(write), "--work-dir", self.work,
                                    "-e", "VAULT_PASSPHRASE=s3cr3t-value", "a"],
                                   env=env, pass_fds=(write,), stderr=subprocess.PIPE, text=True)
        os.close(write)
        with os.fdopen(read) as stream:
            records = [json.loads(line) for line in stream]
        _, stderr = process.communicate()
        self.assertEqual(0, process.returncode)
        names = [r["event"] for r in records if r["event"] != "warning"]
        self.assertEqual("process-start", names[0])
        self.assertEqual("process-end", names[-1])
        for expected in ("phase-start", "hook-start", "hook-end", "phase-end"):
            self.assertIn(expected, names)
        self.assertEqual([(50, 100), (100, 100)],
                         [(r["done"], r["total"]) for r in records if r["event"] == "progress"])
        self.assertNotIn("s3cr3t-value", json.dumps(records) + stderr)
        self.assertIn("done with ***", json.dumps(records))
        with open(os.path.join(self.work, "journal.jsonl")) as f:
            self.assertNotIn("s3cr3t-value", f.read())

    def test_after_error_without_terminal_keeps_the_failure(self):
        self.element("a", {"validate.d/10-v": "#!/bin/bash\nexit 1\n"})
        result = self.process("a", "--break", "after-error", check=1, stdin=subprocess.DEVNULL)
        self.assertIn("break point after-error: no terminal attached", result.stderr)


class WorkDirTest(RunnerCase):

    def work_dirs(self):
        return [d for d in os.listdir(self.tmp) if d.startswith("euca-image-process.")]

    def test_created_work_dir_is_removed_and_logs_outlive_a_failure(self):
        self.element("ok", {"mount.d/10-log": BASH + 'echo hello > "$IMG_WORK_DIR/logs/daemon.log"\n'})
        self.process("ok", keep=False, check=0)
        self.assertEqual([], self.work_dirs())
        self.element("bad", {"validate.d/10-fail": "#!/bin/bash\nexit 1\n"})
        result = self.process("ok", "bad", keep=False, check=1)
        [work] = self.work_dirs()
        self.assertEqual(["logs"], os.listdir(os.path.join(self.tmp, work)))
        with open(os.path.join(self.tmp, work, "logs", "daemon.log")) as f:
            self.assertEqual("hello\n", f.read())
        self.assertIn("logs kept in", result.stderr)
