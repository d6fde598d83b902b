"""The cleanup journal: every resource a process creates, recorded on disk.

The journal is a JSON-lines file.  A line ``{"id": ..., "undo": ACTION, ...}``
records a resource the moment it exists; a line ``{"done": ID}`` says it is
gone.  Unwinding undoes every pending entry last-in-first-out.  Undo actions
are data, never code, so that ``euca-image-process --cleanup WORKDIR`` can
finish the job after the process that wrote them was SIGKILLed.

Actions:
  umount  path                 unmount (FUSE mounts included)
  detach  device, backing      detach a loop device, if it still backs `backing`
  kill    pid, start, group    SIGTERM then SIGKILL a process (its whole
                               process group if `group`), if `start` (its
                               start time in /proc) still matches
  remove  path                 delete a file or a directory tree
  run     argv                 run a command (a hook's own undo step)

A failing undo step is reported and the others still run.
"""

import json
import os
import signal
import sys
import time

ACTIONS = ("umount", "detach", "kill", "remove", "run")


class UndoError(Exception):
    pass


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def process_state(pid):
    """The state letter of `pid` (R, S, Z, ...), or None if there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_start_time(pid):
    """Start time of `pid` in clock ticks, or None if there is no such process."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == "Z":
        return None  # gone, or dead and waiting only to be reaped by its parent
    return int(fields[19])


class Journal:
    """Append-only record of resources; `scope` tags entries for partial unwinding."""

    def __init__(self, path, scope=None):
        self.path = path
        self.scope = scope

    # -- writing -----------------------------------------------------------
    def _append(self, record):
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        # O_APPEND writes of one short line are atomic, so hooks writing at
        # the same time as the runner never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # no fsync: the page cache outlives a SIGKILL
        finally:
            os.close(fd)

    def add(self, undo, scope=None, **args):
        """Record a resource; returns the id to pass to done() or undo()."""
        if undo not in ACTIONS:
            raise ValueError(f"unknown undo action {undo!r}; one of {', '.join(ACTIONS)}")
        if undo == "kill" and "start" not in args:
            args["start"] = process_start_time(args["pid"])
        entry_id = os.urandom(6).hex()  # not uuid: its import costs every process ~2 ms
        self._append(dict(args, id=entry_id, undo=undo, scope=scope or self.scope))
        return entry_id

    def done(self, entry_id):
        """The resource is gone (released by its owner)."""
        self._append({"done": entry_id})

    # -- reading and unwinding ---------------------------------------------
    def pending(self, scope=None):
        """Entries not yet done, oldest first."""
        entries, finished = [], set()
        try:
            with open(self.path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if "done" in record:
                finished.add(record["done"])
            else:
                entries.append(record)
        return [e for e in entries
                if e["id"] not in finished and (scope is None or e.get("scope") == scope)]

    def undo(self, entry_id):
        for entry in self.pending():
            if entry["id"] == entry_id:
                _undo(entry)
                self.done(entry_id)
                return
        raise KeyError(entry_id)

    def unwind(self, scope=None, log=None):
        """Undo all pending entries, newest first; returns the failures as text."""
        failures = []
        for entry in reversed(self.pending(scope)):
            try:
                _undo(entry)
            except Exception as exc:  # one failure must not stop the others
                message = f"cleanup {describe(entry)} failed: {exc}"
                failures.append(message)
                if log:
                    log(message)
                continue
            self.done(entry["id"])
        return failures


def describe(entry):
    if "argv" in entry:
        return "run " + " ".join(entry["argv"])
    keys = [k for k in ("path", "device", "pid") if k in entry]
    return entry["undo"] + " " + " ".join(str(entry[k]) for k in keys)


# Where the system's tools live.  umount and losetup are in sbin, which the caller's PATH may
# lack (a service started from a user's shell, the runner's own process): attach, mount and
# their undo search it after the caller's PATH (tool_env), or an unwind would leave loop
# devices attached.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool_env():
    """The caller's environment with the system's tool directories at the end of PATH."""
    return dict(os.environ, PATH=os.pathsep.join(filter(None, [os.environ.get("PATH"), SYSTEM_PATH])))


def _run(argv, env=None):
    """argv; env: the command's environment, tool_env() when None."""
    import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else tool_env())
    if result.returncode:
        raise UndoError(f"{' '.join(argv)}: {result.stderr.strip() or 'exit %d' % result.returncode}")


def _mounted(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with spaces escaped as \040.
        return any(line.split()[4].replace("\\040", " ") == real for line in f)


def _undo(entry):
    action = entry["undo"]
    if action == "umount":
        if not _mounted(entry["path"]):
            return
        for attempt in range(20):
            import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
            result = subprocess.run(["umount", entry["path"]], stderr=subprocess.PIPE, text=True, env=tool_env())
            if result.returncode == 0 or not _mounted(entry["path"]):
                return
            time.sleep(0.05 * (attempt + 1))  # busy: a process is still leaving it
        _run(["umount", "--lazy", entry["path"]])
    elif action == "detach":
        backing = entry.get("backing")
        name = os.path.basename(entry["device"])
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                current = f.read().strip()
        except OSError:
            return  # already detached
        if backing and os.path.realpath(backing) != current.removesuffix(" (deleted)"):
            return  # the number was reused for somebody else's file
        _run(["losetup", "-d", entry["device"]])
    elif action == "kill":
        pid = entry["pid"]
        if process_start_time(pid) != entry.get("start"):
            return  # gone, or the pid was reused
        group = entry.get("group", False)
        _signal(pid, signal.SIGTERM, group)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            _reap(pid)
            if process_start_time(pid) != entry.get("start"):
                break
            time.sleep(0.02)
        else:
            _signal(pid, signal.SIGKILL, group)
            _reap(pid)
        if group:  # children that outlived their leader (a pgid is not reused while it exists)
            _signal(pid, signal.SIGKILL, group)
            _wait_group_gone(pid)
    elif action == "remove":
        path = entry["path"]
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    elif action == "run":
        _run(entry["argv"], env=os.environ)  # a hook's own command: the caller's environment


def _signal(pid, sig, group):
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid, timeout=2):
    """Until no process of the group is left (a sandbox's inner process ends a moment
    after its leader): whoever checks for leftovers next must not see it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = [pid for pid in os.listdir("/proc") if pid.isdigit()
                   and (_stat_fields(pid) or ["", "", ""])[2] == str(pgid)
                   and (_stat_fields(pid) or ["Z"])[0] != "Z"]
        if not members:
            return
        for member in members:
            _reap(int(member))
        time.sleep(0.02)


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv=None):
    """Command line used by lib/img-functions: `python -m imaging_elements.sdk.journal`."""
    argv = sys.argv[1:] if argv is None else argv
    path = os.environ.get("IMG_JOURNAL")
    if not path:
        sys.exit("img journal: IMG_JOURNAL is not set (not running under euca-image-process?)")
    journal = Journal(path, scope=os.environ.get("IMG_JOURNAL_SCOPE") or None)
    if not argv:
        sys.exit("usage: journal add ACTION KEY=VALUE... | done ID | undo ID")
    verb, rest = argv[0], argv[1:]
    if verb == "add":
        args = dict(item.split("=", 1) for item in rest[1:] if "=" in item)
        if "pid" in args:
            args["pid"] = int(args["pid"])
        if rest[0] == "run":
            args = {"argv": [item for item in rest[1:]]}
        print(journal.add(rest[0], **args))
    elif verb == "done":
        journal.done(rest[0])
    elif verb == "undo":
        journal.undo(rest[0])
    else:
        sys.exit(f"img journal: unknown verb {verb!r}")


if __name__ == "__main__":
    main()
