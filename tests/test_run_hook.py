"""runner.run_hook: one host hook run as a process runs it (docs/api.md), with real processes."""

import json
import os
import threading
import time

from imaging_elements.engine import hookrun, hooks, runner
from imaging_elements.engine.interrupts import Cancelled
from imaging_elements.sdk.journal import Journal
from tests import base, hookcall


class RunHookTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.state = hookcall.state(self.path("work"), IMG_DISK_TYPE="raw")

    def hook(self, phase, body, name="10-hook"):
        path = self.path("el", f"{phase}.d", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(body)
        os.chmod(path, 0o755)
        return hooks.Hook(phase, name, path, "el")

    def test_the_environment_is_the_runners(self):
        hook = self.hook("mount", "#!/usr/bin/env python3\nimport os, json\n"
                                  "from imaging_elements.sdk import hooklib\n"
                                  "hooklib.describe(json.dumps({k: os.environ.get(k) for k in ("
                                  "'IMG_PHASE', 'IMG_HOOK', 'IMG_ELEMENT', 'IMG_JOURNAL_SCOPE', 'IMG_JOURNAL', "
                                  "'IMG_LIB', 'IMG_DISK_TYPE', 'TMPDIR')}))\n")
        code, _, channel = runner.run_hook(hook, self.state, Journal(self.state["IMG_JOURNAL"]))
        self.assertEqual(0, code)
        seen = json.loads(channel.describe[0])
        self.assertEqual({"IMG_PHASE": "mount", "IMG_HOOK": "10-hook", "IMG_ELEMENT": "el",
                          "IMG_JOURNAL_SCOPE": "mount", "IMG_JOURNAL": self.state["IMG_JOURNAL"],
                          "IMG_LIB": self.state["IMG_LIB"], "IMG_DISK_TYPE": "raw",
                          "TMPDIR": self.state["IMG_SCRATCH_DIR"]}, seen)
        self.assertEqual(runner.hook_environment(hook, self.state)["PATH"],
                         runner.base_environment(self.state)["PATH"])

    def test_set_lines_change_the_state_within_the_phase_rules(self):
        hook = self.hook("mount", "#!/bin/bash\nsource \"$IMG_LIB/img-functions\"\n"
                                  "img_set IMG_DISK_TYPE partition\nimg_set IMG_FOO bar\n"
                                  "img_set IMG_WORK_DIR /elsewhere\nimg_describe done\n")
        events = hookcall.Events()
        work = self.state["IMG_WORK_DIR"]
        code, _, channel = runner.run_hook(hook, self.state, Journal(self.state["IMG_JOURNAL"]), events)
        self.assertEqual((0, ["done"]), (code, channel.describe))
        self.assertEqual(("partition", "bar", work), (self.state["IMG_DISK_TYPE"], self.state["IMG_FOO"],
                                                       self.state["IMG_WORK_DIR"]))
        self.assertEqual(["mount/10-hook (el): may not set IMG_WORK_DIR: the runner's or the operator's "
                          "setting; ignored"], [e["message"] for e in events.named("warning")])
        # A convert hook may not set the disk type (only mount's `settable` allows it).
        other = self.hook("convert", "#!/bin/bash\nsource \"$IMG_LIB/img-functions\"\n"
                                     "img_set IMG_DISK_TYPE vmdk\n")
        runner.run_hook(other, self.state, Journal(self.state["IMG_JOURNAL"]))
        self.assertEqual("partition", self.state["IMG_DISK_TYPE"])

    def test_failure_output_and_secrets(self):
        self.state["IMG_DB_PASSWORD"] = "hunter2hunter2"
        hook = self.hook("validate", "#!/bin/bash\nsource \"$IMG_LIB/img-functions\"\n"
                                     "echo \"the password is $IMG_DB_PASSWORD\"\nimg_fail broken\n")
        events = hookcall.Events()
        code, tail, channel = runner.run_hook(hook, self.state, Journal(self.state["IMG_JOURNAL"]), events)
        self.assertEqual((1, "broken", False), (code, channel.fail, channel.bad_input))
        self.assertIn("the password is ***", tail)
        self.assertIn("10-hook: the password is ***", [e["message"] for e in events.named("log")])

    def test_time_limit_stops_the_whole_group_and_leaves_the_journal_clean(self):
        hook = self.hook("mount", "#!/bin/bash\nsleep 60 &\necho $! > \"$IMG_WORK_DIR/child\"\nwait\n")
        journal = Journal(self.state["IMG_JOURNAL"])
        started = time.monotonic()
        self.assertRaises(hookrun.TimedOut, runner.run_hook, hook, self.state, journal, timeout=1)
        self.assertLess(time.monotonic() - started, 10)
        with open(os.path.join(self.state["IMG_WORK_DIR"], "child")) as f:
            child = int(f.read())
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(os.path.exists(f"/proc/{child}"), "the hook's child outlived it")
        self.assertEqual([], journal.pending())

    def test_cancel_stops_it(self):
        hook = self.hook("mount", "#!/bin/bash\nsleep 60\n")
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()
        journal = Journal(self.state["IMG_JOURNAL"])
        self.assertRaises(Cancelled, runner.run_hook, hook, self.state, journal, cancel=cancel)
        self.assertEqual([], journal.pending())

    def test_a_hook_that_runs_inside_the_image_is_refused(self):
        hook = self.hook("install", "#!/bin/sh\ntrue\n")
        error = self.assertRaises(ValueError, runner.run_hook, hook, self.state,
                                  Journal(self.state["IMG_JOURNAL"]))
        self.assertIn("install/10-hook runs inside the image", str(error))
