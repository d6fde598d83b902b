"""engine/tools.py: system tools through `sh` (timeout, error text, environment,
process group, cancel), and the bad-input status a hook reports with it."""

import os
import subprocess
import sys
import time

from imaging_elements.sdk import hooklib
from imaging_elements.engine import hookrun, tools
from tests import base, imagebuild

MiB = imagebuild.MiB


class RunTest(base.TestCase):

    def test_output_as_text_or_bytes(self):
        self.assertEqual(tools.Result(0, "a b\n", ""), tools.run(["echo", "a", "b"]))
        self.assertEqual(b"\xff\x00", tools.run(["cat"], input=b"\xff\x00", binary=True).stdout)
        self.assertEqual("typed in", tools.run(["cat"], input="typed in").stdout)
        # No input: /dev/null, never the caller's stdin.
        self.assertEqual("", tools.run(["cat"]).stdout)

    def test_error_names_the_tool_its_exit_code_and_the_end_of_its_stderr(self):
        script = "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 7"
        with self.assertRaises(tools.ToolError) as caught:
            tools.run(["sh", "-c", script], "disk.raw: reading its table")
        error = caught.exception
        self.assertEqual("disk.raw: reading its table: sh failed (exit 7): line3 / line4 / line5 / line6 / line7",
                         str(error))
        self.assertEqual(("sh", 7), (error.tool, error.code))
        self.assertIn("line1", error.stderr)
        # A HookFailure: a hook that lets it through fails with these words (hooklib.main).
        self.assertIsInstance(error, hooklib.HookFailure)

    def test_other_exit_codes_may_be_fine(self):
        self.assertEqual(2, tools.run(["sh", "-c", "exit 2"], ok=(0, 2)).code)

    def test_a_missing_tool(self):
        with self.assertRaises(tools.ToolError) as caught:
            tools.run(["no-such-tool-here", "x"], "probing")
        self.assertEqual("probing: no-such-tool-here: command not found (is it installed?)", str(caught.exception))
        self.assertIsNone(caught.exception.code)

    def test_killed_by_a_signal(self):
        with self.assertRaises(tools.ToolError) as caught:
            tools.run(["sh", "-c", "kill -9 $$"])
        self.assertEqual("sh failed (killed by signal 9)", str(caught.exception))

    def test_a_killed_tool_is_an_error_not_a_traceback(self):
        """sh reports a signal from its background thread: nothing of it reaches the
        hook's stderr (the user's log), only the ToolError."""
        code = ("import time\nfrom imaging_elements.engine import tools\n"
                "for argv, timeout in ((['sh', '-c', 'kill -9 $$'], 600), (['sleep', '30'], 0.3)):\n"
                "    try:\n        tools.run(argv, timeout=timeout)\n"
                "    except tools.ToolError as exc:\n        print(exc)\n"
                "time.sleep(1.5)\n")
        result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONPATH=base.ROOT))
        self.assertEqual(("sh failed (killed by signal 9)\nsleep did not finish in 0.3 s (killed)\n", ""),
                         (result.stdout, result.stderr))

    def test_timeout_kills_the_tool(self):
        marker = f"sleep-{os.getpid()}-{time.monotonic_ns()}"
        started = time.monotonic()
        with self.assertRaises(tools.ToolError) as caught:
            tools.run(["bash", "-c", f"exec -a {marker} sleep 30"], timeout=0.5)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual("bash did not finish in 0.5 s (killed)", str(caught.exception))
        self.assertEqual("", subprocess.run(["pgrep", "-f", marker], stdout=subprocess.PIPE, text=True).stdout)

    def test_cancel_kills_the_tool(self):
        class Cancelled(Exception):
            pass
        started = time.monotonic()

        def check():
            if time.monotonic() - started > 0.3:
                raise Cancelled()
        with self.assertRaises(Cancelled):
            tools.run(["sleep", "30"], check=check)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual("ok\n", tools.run(["echo", "ok"], check=lambda: None).stdout)

    def test_an_exception_from_a_signal_handler_kills_the_tool(self):
        """A hook's SIGTERM handler raises (qemuimg.terminate): the tool must not outlive it."""
        marker = f"sleep-{os.getpid()}-{time.monotonic_ns()}"
        code = ("import signal, sys\nfrom imaging_elements.engine import tools\n"
                "def stop(*_): raise SystemExit(143)\n"
                "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\n"
                f"tools.run(['bash', '-c', 'exec -a {marker} sleep 30'])\n")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=base.ROOT))
        self.assertEqual("ready\n", process.stdout.readline())
        deadline = time.monotonic() + 10
        while not subprocess.run(["pgrep", "-f", marker], stdout=subprocess.PIPE).stdout:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        process.send_signal(15)
        self.assertEqual(143, process.wait(timeout=10))
        process.stdout.close()
        self.assertEqual(b"", subprocess.run(["pgrep", "-f", marker], stdout=subprocess.PIPE).stdout)

    def test_a_clean_environment(self):
        os.environ["TOOLS_TEST_SECRET"] = "x"
        self.addCleanup(os.environ.pop, "TOOLS_TEST_SECRET")
        self.assertIn("TOOLS_TEST_SECRET=x", tools.run(["env"]).stdout)
        self.assertEqual(sorted(f"{k}={v}" for k, v in tools.CLEAN_ENV.items()),
                         sorted(tools.run(["env"], env=tools.CLEAN_ENV).stdout.splitlines()))

    def test_the_tool_stays_in_the_callers_process_group(self):
        """Killing a hook's process group (the runner's cancel) kills its tools too
        (sh 1.x would start each in a session of its own)."""
        group = tools.run(["sh", "-c", "ps -o pgid= -p $$"]).stdout.strip()
        self.assertEqual(str(os.getpgrp()), group)

    def test_preexec_fn_runs_in_the_child(self):
        """mcopy runs under RLIMIT_FSIZE: the limit holds in the tool, not in the caller."""
        import resource
        before = resource.getrlimit(resource.RLIMIT_FSIZE)
        out = tools.run(["sh", "-c", "ulimit -f"],
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 512, 1024 * 512)))
        self.assertEqual("1024", out.stdout.strip())  # ulimit -f counts 512-byte blocks
        self.assertEqual(before, resource.getrlimit(resource.RLIMIT_FSIZE))

    def test_blkid_on_a_real_image(self):
        tree = imagebuild.linux_tree(self.path("tree"))
        fs = imagebuild.make_fs(self.path("fs.ext4"), tree, size=8 * MiB, label="toolstest")
        out = tools.run(["blkid", "-p", "-o", "export", fs]).stdout
        self.assertIn("TYPE=ext4", out.splitlines())
        self.assertIn("LABEL=toolstest", out.splitlines())
        with open(self.path("zeros"), "wb") as f:
            f.truncate(MiB)
        self.assertEqual(2, tools.run(["blkid", "-p", self.path("zeros")], ok=(0, 2)).code)  # nothing found

    def test_sh_is_imported_only_to_run_a_tool(self):
        code = ("import sys; from imaging_elements.engine import tools; a = 'sh' in sys.modules; "
                "tools.run(['true']); print(a, 'sh' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=base.ROOT)).stdout
        self.assertEqual("False True\n", out)


class BadInputTest(base.TestCase):

    def test_bad_input_is_a_status_line_then_the_words(self):
        code = ("from imaging_elements.engine import tools\n"
                "class Torn(ValueError, tools.BadInput): pass\n"
                "tools.report(Torn('x.vmdk: torn'))")
        env = {k: v for k, v in os.environ.items() if k != "IMG_STATUS_FD"}
        result = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                env=dict(env, PYTHONPATH=base.ROOT))
        self.assertEqual(1, result.returncode)
        self.assertEqual('{"bad-input": "x.vmdk: torn"}\nx.vmdk: torn\n', result.stderr)
        self.assertEqual((3, "x.vmdk: torn"), hookrun.said(result.stderr))

    def test_bash_hooks_say_img_bad_input(self):
        lib = os.path.join(base.ROOT, "lib", "img-functions")
        env = {k: v for k, v in os.environ.items() if k != "IMG_STATUS_FD"}
        result = subprocess.run(["bash", "-c", f'source {lib}; img_bad_input "x.vhd: torn footer"; echo never'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.assertEqual((1, ""), (result.returncode, result.stdout))
        self.assertEqual((3, "x.vhd: torn footer"), hookrun.said(result.stderr))

    def test_an_error_not_marked_is_a_failure(self):
        code = "from imaging_elements.sdk import hooklib; from imaging_elements.engine import tools; " \
               "hooklib.main(lambda: tools.report(ValueError('no space')))"
        result = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=base.ROOT, IMG_STATUS_FD=""))
        self.assertEqual((1, "no space"), hookrun.said(result.stderr))

    def test_mount_reason_hides_our_device_and_mount_point(self):
        text = ("mount -t ext4 -o ro /dev/loop7 /var/tmp/w/mnt failed (exit 32): mount: /var/tmp/w/mnt: wrong fs "
                "type, bad option, bad superblock on /dev/loop7, missing codepage or helper program, or other "
                "error.\n       dmesg(1) may have more information after failed mount system call.")
        self.assertEqual(("wrong fs type, bad option, bad superblock, missing codepage or helper program, "
                          "or other error.", False), tools.mount_reason(text, "/dev/loop7", "/var/tmp/w/mnt"))
        reason, host = tools.mount_reason("mount: /m: unknown filesystem type 'zfs'.", "/dev/loop1", "/m")
        self.assertEqual(("unknown filesystem type 'zfs'.", True), (reason, host))
