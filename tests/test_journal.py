"""The cleanup journal: order, durability, and care with reused pids and devices."""

import os
import subprocess
import time

import fixtures

from imaging_elements.sdk import hooklib
from imaging_elements.sdk.journal import Journal, process_start_time
from tests import base, imagebuild


class JournalTest(base.TestCase):

    def journal(self):
        return Journal(self.path("journal.jsonl"))

    def test_unwinds_newest_first_and_goes_on_after_a_failure(self):
        journal = self.journal()
        order = self.path("order")
        journal.add("run", argv=["sh", "-c", f"echo first >> {order}"])
        journal.add("run", argv=["false"])
        journal.add("run", argv=["sh", "-c", f"echo last >> {order}"])
        failures = journal.unwind()
        self.assertEqual(1, len(failures))
        self.assertIn("run false failed", failures[0])
        with open(order) as f:
            self.assertEqual(["last", "first"], f.read().split())
        # The failed step stays pending for a later --cleanup; the others are done.
        self.assertEqual([["false"]], [e["argv"] for e in journal.pending()])

    def test_done_entries_and_torn_lines(self):
        journal = self.journal()
        kept = journal.add("remove", path=self.path("a"))
        gone = journal.add("remove", path=self.path("b"))
        journal.done(gone)
        with open(journal.path, "a") as f:
            f.write('{"id": "cut-sh')  # a crash in the middle of a write
        self.assertEqual([kept], [e["id"] for e in journal.pending()])

    def test_scopes(self):
        journal = self.journal()
        os.makedirs(self.path("m"))
        Journal(journal.path, scope="mount").add("remove", path=self.path("m"))
        journal.add("remove", path=self.path("other"))
        journal.unwind(scope="mount")
        self.assertFalse(os.path.exists(self.path("m")))
        self.assertEqual([self.path("other")], [e["path"] for e in journal.pending()])

    def test_kill_process_group(self):
        process = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60; wait"], start_new_session=True)
        time.sleep(0.2)
        journal = self.journal()
        journal.add("kill", pid=process.pid, group=True)
        self.assertEqual([], journal.unwind())
        self.assertIsNotNone(process.poll())
        deadline = time.monotonic() + 5  # the orphans' reaping by init takes a moment
        while time.monotonic() < deadline:
            leftovers = subprocess.run(["pgrep", "-g", str(process.pid)], stdout=subprocess.PIPE, text=True)
            if not leftovers.stdout:
                break
            time.sleep(0.05)
        self.assertEqual("", leftovers.stdout)

    def test_reused_pid_is_not_killed(self):
        process = subprocess.Popen(["sleep", "60"])
        self.addCleanup(process.kill)
        journal = self.journal()
        journal.add("kill", pid=process.pid, start=process_start_time(process.pid) - 1)
        journal.unwind()
        self.assertIsNone(process.poll())


class LoopJournalTest(base.TestCase):

    needs_root = True

    def test_attach_and_detach_without_sbin_on_path(self):
        """hooklib.losetup attaches and the journal detaches with the system's PATH: the
        runner's own process (--scratch-limit, instance validation) may have a PATH without sbin."""
        image = imagebuild.make_fs(self.path("fs.img"), size=4 * imagebuild.MiB)
        journal = self.journal()
        self.useFixture(fixtures.EnvironmentVariable("PATH", "/usr/bin:/bin"))
        device, _ = hooklib.losetup(image, journal_=journal)
        self.assertIn(image, subprocess.run(["/usr/sbin/losetup", device], stdout=subprocess.PIPE,
                                            text=True).stdout)
        journal.unwind()
        self.assertNotIn(image, subprocess.run(["/usr/sbin/losetup", "-a"], stdout=subprocess.PIPE,
                                               text=True).stdout)

    def test_detach_checks_the_backing_file(self):
        image = imagebuild.make_fs(self.path("fs.img"), size=4 * imagebuild.MiB)
        other = imagebuild.make_fs(self.path("other.img"), size=4 * imagebuild.MiB)
        device = subprocess.run(["losetup", "--find", "--show", image], stdout=subprocess.PIPE,
                                text=True, check=True).stdout.strip()
        journal = self.journal()
        journal.add("detach", device=device, backing=other)  # as if the number were reused
        journal.unwind()
        self.assertIn(device, subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout)
        # The caller's PATH need not have sbin (a service started from a user's shell).
        self.useFixture(fixtures.EnvironmentVariable("PATH", "/usr/bin:/bin"))
        journal.add("detach", device=device, backing=image)
        journal.unwind()
        self.assertNotIn(image, subprocess.run(["/usr/sbin/losetup", "-a"], stdout=subprocess.PIPE,
                                               text=True).stdout)

    def journal(self):
        return Journal(self.path("journal.jsonl"))
