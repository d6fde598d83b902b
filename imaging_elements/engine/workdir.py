"""The work directory of one image process: created (or the user's), locked,
its journal, its scratch space (a filesystem of its own under --scratch-limit),
removed at the end; and --cleanup of one a killed process left."""

import contextlib
import fcntl
import os

from imaging_elements.engine import interrupts
from imaging_elements.sdk.journal import Journal, describe

CREATED = ".created-by-euca-image-process"


class WorkDirError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def open_work_dir(stack, work_dir, warn, remove=True, failed=lambda: False, tmpdir="/var/tmp"):
    """The work directory, locked until `stack` unwinds.  work_dir None: a new
    one under `tmpdir`, removed when `stack` unwinds if `remove` (its logs kept
    if failed()).  Returns its path; raises WorkDirError."""
    if work_dir:
        work = os.path.abspath(work_dir)
        os.makedirs(work, exist_ok=True)
        created = False
    else:
        import tempfile  # here: a process given its work dir does without it (start-up)
        # /var/tmp, not /tmp: images are large and /tmp may be in memory.
        work = tempfile.mkdtemp(prefix="euca-image-process.", dir=tmpdir)
        created = True
        with open(os.path.join(work, CREATED), "w"):
            pass
    lock = open(os.path.join(work, "lock"), "w")  # noqa: SIM115 (held until the stack unwinds)
    stack.callback(lock.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkDirError(2, f"{work}: another euca-image-process is using this work dir") from None
    if created and remove:
        # After a failure the logs (a guest's console, daemons' output) stay.
        stack.callback(lambda: remove_work_dir(work, warn, keep_logs=failed()))
    return work


def journal_of(work):
    return Journal(os.path.join(work, "journal.jsonl"))


def fill(work, journal):
    """Refuse a work dir with resources an earlier process left; make its directories.
    Returns (scratch, mount point)."""
    leftover = journal.pending()
    if leftover:
        raise WorkDirError(2, f"{work}: {len(leftover)} resource(s) left by an earlier process; "
                              f"run euca-image-process --cleanup {work} first")
    if os.path.exists(journal.path):
        # Nothing pending: the earlier process's records are history.  Started afresh, so
        # that the journal of a reused work dir does not grow (and get slower to read) forever.
        os.truncate(journal.path, 0)
    for name in ("scratch", "mnt", "logs"):
        os.makedirs(os.path.join(work, name), exist_ok=True)
    return os.path.join(work, "scratch"), os.path.join(work, "mnt")


def limit_scratch(work, scratch, limit, journal, check=lambda: None):
    """--scratch-limit: the scratch directory becomes a filesystem of that size,
    so that whatever writes there meets ENOSPC at the limit, while it writes.
    Every resource is in `journal`; raises WorkDirError."""
    from imaging_elements.engine import tools  # here: only --scratch-limit needs them (start-up)
    from imaging_elements.sdk import hooklib
    image = os.path.join(work, "scratch.ext4")
    journal.add("remove", path=image)
    with open(image, "wb") as f:
        f.truncate(limit)  # sparse: it takes host space only as scratch fills
    try:
        tools.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-E", "nodiscard", image],
                  "--scratch-limit: cannot make the scratch filesystem", check=check)
    except tools.ToolError as exc:
        raise WorkDirError(1, str(exc)) from None
    # Our own loop device, detached through the journal: with mount -o loop the kernel
    # lets go of it some time after the umount, not when the process ends.
    try:
        device, _ = hooklib.losetup(image, readonly=False, journal_=journal)
    except hooklib.HookFailure as exc:
        raise WorkDirError(1, f"--scratch-limit: {exc}") from exc
    # Journal first: undoing an umount of a path that is not mounted does nothing.
    journal.add("umount", path=os.path.realpath(scratch))
    try:
        tools.run(["mount", "-t", "ext4", "-o", "nodev,nosuid", device, scratch],
                  "--scratch-limit: cannot mount the scratch filesystem", check=check)
    except tools.ToolError as exc:
        raise WorkDirError(1, str(exc)) from None
    os.rmdir(os.path.join(scratch, "lost+found"))


def mounts_under(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def remove_work_dir(work, warn, keep_logs=False):
    """Remove a work dir we created, unless something is still mounted in it;
    with keep_logs, all but a non-empty logs/ (for a failed process)."""
    busy = mounts_under(work)
    if busy:
        warn(f"{work}: not removed, still mounted: {', '.join(busy)}")
        return
    import shutil  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    logs = os.path.join(work, "logs")
    if keep_logs and os.path.isdir(logs) and os.listdir(logs):
        for name in os.listdir(work):
            path = os.path.join(work, name)
            if name == "logs":
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        warn(f"logs kept in {logs}")
        return
    shutil.rmtree(work, ignore_errors=True)


def cleanup_work_dir(work, warn, say=None):
    """--cleanup: unwind what a killed process left; returns (exit code, error).
    say(text) is told what was released, or that there was nothing."""
    say = say or warn
    journal_path = os.path.join(work, "journal.jsonl")
    if not os.path.isfile(journal_path):
        return 2, f"{work}: no cleanup journal here (not a work directory?)"
    with open(os.path.join(work, "lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 2, f"{work}: a running euca-image-process still uses it"
        journal = Journal(journal_path)
        pending = journal.pending()
        with interrupts.deferred():
            failures = journal.unwind(log=warn)
    released = [describe(e) for e in reversed(pending)
                if not any(f.startswith(f"cleanup {describe(e)} failed") for f in failures)]
    say(f"{work}: released {len(released)}: {', '.join(released)}" if released
        else f"{work}: nothing to release")
    if failures:
        return 5, "; ".join(failures)
    if os.path.exists(os.path.join(work, CREATED)):
        remove_work_dir(work, warn)
    return 0, None


def newest_file(path):
    """The regular file under `path` changed last (the one being written), or None."""
    newest, when = None, -1.0
    for directory, _, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                st = os.lstat(full)
                if st.st_mtime > when and not os.path.islink(full):
                    newest, when = full, st.st_mtime
    return newest
