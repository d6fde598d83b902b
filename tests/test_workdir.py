"""The work directory (workdir.py): created, locked, filled, removed, cleaned up after a kill."""

import contextlib
import os

from imaging_elements.engine import workdir
from tests import base


class WorkDirTest(base.TestCase):

    def test_created_locked_and_removed(self):
        warnings = []
        with contextlib.ExitStack() as stack:
            work = workdir.open_work_dir(stack, None, warnings.append, tmpdir=self.tmp)
            self.assertTrue(os.path.isfile(os.path.join(work, workdir.CREATED)))
            with contextlib.ExitStack() as other:
                error = self.assertRaises(workdir.WorkDirError, workdir.open_work_dir, other, work,
                                          warnings.append)
            self.assertEqual((2, f"{work}: another euca-image-process is using this work dir"),
                             (error.code, str(error)))
            scratch, mount_point = workdir.fill(work, workdir.journal_of(work))
            self.assertEqual((os.path.join(work, "scratch"), os.path.join(work, "mnt")), (scratch, mount_point))
        self.assertFalse(os.path.exists(work))

    def test_logs_kept_after_a_failure(self):
        warnings = []
        with contextlib.ExitStack() as stack:
            work = workdir.open_work_dir(stack, None, warnings.append, failed=lambda: True, tmpdir=self.tmp)
            workdir.fill(work, workdir.journal_of(work))
            with open(os.path.join(work, "logs", "console.log"), "w") as f:
                f.write("boot\n")
        self.assertEqual(["logs", "console.log"], [os.listdir(work)[0], *os.listdir(os.path.join(work, "logs"))])
        self.assertEqual([f"logs kept in {work}/logs"], warnings)

    def test_users_work_dir_is_kept(self):
        work = self.path("mine")
        with contextlib.ExitStack() as stack:
            self.assertEqual(work, workdir.open_work_dir(stack, work, print))
        self.assertTrue(os.path.isdir(work))

    def test_leftover_refused_then_cleaned_up(self):
        work, leftover = self.path("work"), self.path("work", "scratch", "left")
        with contextlib.ExitStack() as stack:
            workdir.open_work_dir(stack, work, print)
            journal = workdir.journal_of(work)
            workdir.fill(work, journal)
            open(leftover, "w").close()
            journal.add("remove", path=leftover)
        error = self.assertRaises(workdir.WorkDirError, workdir.fill, work, workdir.journal_of(work))
        self.assertIn("run euca-image-process --cleanup", str(error))
        said = []
        self.assertEqual((0, None), workdir.cleanup_work_dir(work, print, said.append))
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual([f"{work}: released 1: remove {leftover}"], said)
        self.assertEqual((0, None), workdir.cleanup_work_dir(work, print, said.append))
        self.assertEqual(f"{work}: nothing to release", said[-1])
        self.assertEqual(2, workdir.cleanup_work_dir(self.tmp, print)[0])


class ScratchLimitTest(base.TestCase):
    needs_root = True

    def test_scratch_is_a_filesystem_of_that_size(self):
        work = self.path("work")
        with contextlib.ExitStack() as stack:
            workdir.open_work_dir(stack, work, print)
            journal = workdir.journal_of(work)
            stack.callback(journal.unwind)
            scratch, _ = workdir.fill(work, journal)
            workdir.limit_scratch(work, scratch, 16 * 1024 * 1024, journal)
            self.assertEqual([os.path.realpath(scratch)], workdir.mounts_under(work))
            st = os.statvfs(scratch)
            self.assertLess(st.f_blocks * st.f_frsize, 16 * 1024 * 1024)
        self.assertEqual([], workdir.mounts_under(work))
