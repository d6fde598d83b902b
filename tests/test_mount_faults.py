"""Fault injection: the mounters never leak, whatever fails and whenever.

Every step of the mount phase fails in turn (IMG_MOUNT_FAULT, which the
mounter hooks honour: STEP fails right after the step, STEP:kill SIGKILLs the
hook there), and euca-image-process is stopped by SIGTERM, and SIGKILLed then
`--cleanup`ed, with everything mounted.  After each, `losetup -a`,
/proc/mounts and the process table are what they were (base.LeakCheck), and
the cleanup journal has nothing pending.
"""

import os
import signal
import subprocess
import sys
import time

from imaging_elements.sdk.journal import Journal, process_start_time, process_state
from tests import base
from tests.test_mount_support import image, test_elements

# (step, image that reaches it): the steps are named where disk.fault() is called.
STEPS = (
    ("discover", "linux-dos"),
    ("export", "vmdk-stream"),
    ("loop", "vmdk-stream"),
    ("mount", "linux-dos"),
    ("root", "linux-dos"),
    ("fstab", "vmdk-stream"),
    ("ntfs", "windows"),
    ("fat-copy", "linux-gpt"),
    ("export:kill", "vhdx"),
    ("fstab:kill", "qcow2"),
    ("ntfs:kill", "windows"),
    ("fat-copy:kill", "linux-gpt"),
)


class FaultTest(base.TestCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        self.elements = test_elements(self.path("elements"))
        self.work = self.path("work")

    def argv(self, *args):
        return [sys.executable, os.path.join(base.BIN, "euca-image-process"), "--elements-path",
                self.elements, "--work-dir", self.work, *map(str, args)]

    def assertReleased(self):
        self.assertEqual([], Journal(os.path.join(self.work, "journal.jsonl")).pending())
        real = os.path.realpath(self.work)
        with open("/proc/self/mountinfo") as f:
            self.assertEqual([], [line for line in f if line.split()[4].startswith(real + "/")])
        self.assertEqual([], [line for line in base._loops() if real in line])

    def fault(self, step, name):
        result = subprocess.run(self.argv("-i", image(name), "-e", f"MOUNT_FAULT={step}", "mounters"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
        self.assertEqual(1, result.returncode, result.stderr)
        if step.endswith(":kill"):
            self.assertIn("failed: exit -9", result.stderr)
        else:
            self.assertIn(f"fault injected after step {step!r} (IMG_MOUNT_FAULT)", result.stderr)
        self.assertReleased()

    # -- stopping the whole process with everything mounted ---------------------------------
    def start_and_hold(self, name):
        """euca-image-process with `name` mounted, held by the hold-mount element's last hook."""
        ready = self.path("ready")
        process = subprocess.Popen(self.argv("-i", image(name), "-e", f"HOLD_READY={ready}",
                                             "mounters", "hold-mount"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        deadline = time.monotonic() + 120
        while not (os.path.exists(ready) and os.path.getsize(ready)):
            if process.poll() is not None or time.monotonic() > deadline:
                self.fail(f"the process did not reach hold-mount: {process.communicate()[1]}")
            time.sleep(0.05)
        with open(ready) as f:
            hook = int(f.read())
        self.assertTrue(os.path.ismount(os.path.join(self.work, "mnt")))
        return process, hook

    def assertGone(self, pid, start):
        deadline = time.monotonic() + 10
        while process_start_time(pid) == start and process_state(pid) != "Z":
            self.assertLess(time.monotonic(), deadline, f"process {pid} still runs")
            time.sleep(0.05)

    def check_sigterm(self, name):
        process, hook = self.start_and_hold(name)
        start = process_start_time(hook)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        self.assertEqual(143, process.returncode, err)
        self.assertIn("terminated by SIGTERM", err)
        self.assertGone(hook, start)
        self.assertReleased()

    def check_sigkill_then_cleanup(self, name):
        process, hook = self.start_and_hold(name)
        start = process_start_time(hook)
        process.kill()
        process.communicate(timeout=60)
        # Everything is still there: the journal is all that knows it.
        self.assertTrue(os.path.ismount(os.path.join(self.work, "mnt")))
        self.assertNotEqual([], Journal(os.path.join(self.work, "journal.jsonl")).pending())
        result = self.run_bin("euca-image-process", "--cleanup", self.work, timeout=120)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertGone(hook, start)
        self.assertReleased()

    def test_sigterm_vmdk(self):
        self.check_sigterm("vmdk-stream")

    def test_sigterm_windows(self):
        self.check_sigterm("windows")

    def test_sigkill_then_cleanup_vmdk(self):
        self.check_sigkill_then_cleanup("vmdk-stream")

    def test_sigkill_then_cleanup_gpt(self):
        self.check_sigkill_then_cleanup("linux-gpt")

    def test_sigkill_then_cleanup_windows(self):
        self.check_sigkill_then_cleanup("windows")


def _fault_test(step, name):
    def test(self):
        self.fault(step, name)
    test.__doc__ = f"IMG_MOUNT_FAULT={step} on the {name} image"
    return test


for _step, _name in STEPS:
    setattr(FaultTest, "test_fault_" + _step.replace(":", "_").replace("-", "_"), _fault_test(_step, _name))
