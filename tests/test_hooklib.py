"""The hook helpers: bash img_losetup and Python hooklib.losetup are one
implementation, which journals the loop device before it is attached."""

import os
import shutil
import subprocess
import sys

from imaging_elements.sdk.journal import Journal
from tests import base

HOOKS = {
    "bash": ["bash", "-c", 'source "$IMG_LIB/img-functions"; img_losetup "$FILE" ${OFFSET:-}'],
    "python": [sys.executable, "-c", "import os; from imaging_elements.sdk import hooklib; print(hooklib.losetup("
                                     "os.environ['FILE'], int(os.environ.get('OFFSET') or 0))[0])"],
}


class LosetupTest(base.TestCase):
    needs_root = True

    def setUp(self):
        super().setUp()
        self.file = self.path("disk.img")
        with open(self.file, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        self.journal = Journal(self.path("journal.jsonl"))
        self.addCleanup(self._detach_leftovers)

    def _detach_leftovers(self):
        # Only if the code under test leaked one: the test then fails, but the machine stays clean.
        found = subprocess.run(["losetup", "-j", self.file], stdout=subprocess.PIPE, text=True).stdout
        for line in found.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]])

    def run_hook(self, kind, path_dir=None, **extra):
        env = {"PATH": os.pathsep.join(filter(None, [path_dir, os.environ["PATH"]])),
               "PYTHONPATH": base.ROOT, "IMG_LIB": os.path.join(base.ROOT, "lib"), "IMG_PYTHON": sys.executable,
               "IMG_JOURNAL": self.journal.path, "IMG_JOURNAL_SCOPE": "mount", "FILE": self.file, **extra}
        return subprocess.run(HOOKS[kind], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, timeout=60)

    def test_attach_and_journal(self):
        for kind in HOOKS:
            result = self.run_hook(kind, OFFSET="1048576")
            self.assertEqual(0, result.returncode, result.stderr)
            device = result.stdout.strip()
            with open(f"/sys/block/{os.path.basename(device)}/loop/offset") as f:
                self.assertEqual("1048576", f.read().strip())
            [entry] = self.journal.pending()
            self.assertEqual(("detach", device, os.path.realpath(self.file)),
                             (entry["undo"], entry["device"], entry["backing"]))
            self.assertEqual([], self.journal.unwind())

    def test_a_hook_killed_right_after_the_attach_leaks_nothing(self):
        # A losetup that really attaches, then kills the hook's whole process group
        # (SIGKILL), so nothing after the attach can run.
        wrappers = self.path("bin")
        os.makedirs(wrappers)
        with open(os.path.join(wrappers, "losetup"), "w") as f:
            f.write(f'#!/bin/bash\n{shutil.which("losetup")} "$@"; rc=$?\n'
                    f'if [ $rc = 0 ] && [ "${{!#}}" = "{self.file}" ]; then kill -KILL 0; fi\nexit $rc\n')
        os.chmod(os.path.join(wrappers, "losetup"), 0o755)
        for kind in HOOKS:
            result = self.run_hook(kind, wrappers)
            self.assertEqual(-9, result.returncode, (kind, result.stderr))
            attached = subprocess.run(["losetup", "-j", self.file], stdout=subprocess.PIPE, text=True).stdout
            self.assertTrue(attached, f"{kind}: the wrapper did not attach")
            pending = self.journal.pending()
            self.assertEqual([("detach", os.path.realpath(self.file))],
                             [(e["undo"], e["backing"]) for e in pending], kind)
            self.assertEqual(attached.split(":")[0], pending[0]["device"])
            self.assertEqual([], self.journal.unwind())
            self.assertEqual("", subprocess.run(["losetup", "-j", self.file], stdout=subprocess.PIPE,
                                                text=True).stdout)
