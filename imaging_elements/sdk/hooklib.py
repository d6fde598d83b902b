"""The hook SDK's helpers for hooks written in Python; the twin of lib/img-functions.

A Python hook is a few lines:

    #!/usr/bin/env python3
    #@ description: refuse images larger than IMG_MAX_SIZE bytes
    #@ accepts-disk-type: raw
    import os
    from imaging_elements.sdk import hooklib

    def run():
        size = os.path.getsize(hooklib.env("IMG_IMAGE"))
        if size > int(hooklib.env("IMG_MAX_SIZE", "1099511627776")):
            hooklib.fail(f"{size} bytes is too large")
        hooklib.describe(f"size {size} bytes is within the limit")

    hooklib.main(run)

See docs/hooks.md for the protocol these helpers speak.
"""

import contextlib
import json
import os
import sys

from imaging_elements.sdk.journal import Journal, tool_env


class HookFailure(Exception):
    """Raised by fail(); main() turns it into the failure message and exit 1."""


def _emit(record):
    fd = os.environ.get("IMG_STATUS_FD")
    line = json.dumps(record) + "\n"
    if fd:
        try:
            os.write(int(fd), line.encode())
            return
        except OSError:
            pass
    sys.stderr.write(line)


def describe(text):
    """Say what the hook did or checked (validators: what passed)."""
    _emit({"describe": str(text)})


def warn(text):
    _emit({"warn": str(text)})


def set_var(name, value):
    """Change an IMG_* variable for the hooks that follow (e.g. IMG_DISK_TYPE)."""
    if not name.startswith("IMG_"):
        raise ValueError(f"{name}: only IMG_* variables can be set")
    _emit({"set": {name: str(value)}})
    os.environ[name] = str(value)


def progress(done, total):
    _emit({"progress": {"done": int(done), "total": int(total)}})


def fail(reason):
    """Stop the hook with a reason; the runner reports it as the hook's result."""
    raise HookFailure(reason)


def bad_input(reason):
    """Stop the hook: its input is bad (damaged, truncated, unreadable), not the host;
    status `bad-input`, so the process exits 3.  Then the words, as main() prints a failure."""
    _emit({"bad-input": str(reason)})
    print(str(reason), file=sys.stderr)
    sys.exit(1)


def env(name, default=None):
    return os.environ.get(name, default)


def journal():
    return Journal(os.environ["IMG_JOURNAL"], scope=os.environ.get("IMG_JOURNAL_SCOPE") or None)


# -- resources, recorded in the journal the moment they exist ----------------

def run(argv, **kwargs):
    """subprocess.run with check=True and captured text output; errors name the command."""
    import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if result.returncode:
        detail = result.stderr.strip() or result.stdout.strip()
        raise HookFailure(f"{' '.join(map(str, argv))} failed (exit {result.returncode}): {detail}")
    return result.stdout


def losetup(path, offset=0, sizelimit=None, readonly=True, journal_=None):
    """Attach `path` (or a slice of it) to a free loop device: (device, journal id).

    Journal first: a free device is picked and journaled, then attached; if
    another process takes it in between, attaching fails and we try the next.
    So no moment exists where the device is attached but not journaled.
    `journal_` is the hook's own journal unless given.
    """
    record = journal_ or journal()
    backing = os.path.realpath(path)
    last = ""
    for _ in range(20):
        # sbin searched too, as the journal's detach does (journal.tool_env).
        device = run(["losetup", "--find"], env=tool_env()).strip()
        entry = record.add("detach", device=device, backing=backing)
        argv = ["losetup", "--offset", str(offset)]
        argv += ["--sizelimit", str(sizelimit)] if sizelimit else []
        argv += ["--read-only"] if readonly else []
        import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
        result = subprocess.run(argv + [device, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env())
        if result.returncode == 0:
            return device, entry
        record.done(entry)
        last = result.stderr.strip()
        if "busy" not in last:
            break
    raise HookFailure(f"cannot attach a loop device to {path}: {last}")


def mount(source, target, fstype=None, options=("ro", "nodev", "nosuid")):
    os.makedirs(target, exist_ok=True)
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    # Journal first: if mount succeeds and we die before writing, the entry
    # must already be there; undo of a path that is not mounted is a no-op.
    entry = journal().add("umount", path=os.path.realpath(target))
    try:
        run(argv + [source, target], env=tool_env())  # as the journal's umount
    except HookFailure:
        journal().done(entry)
        raise
    return entry


def spawn(argv, **kwargs):
    """Start a long-lived helper process (a daemon); killed at unwind.

    Its output goes to $IMG_WORK_DIR/logs/NAME.log unless `stdout` is given:
    a daemon must not hold the hook's output pipe open after the hook ends.
    """
    import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    if "stdout" not in kwargs:
        logs = os.path.join(os.environ.get("IMG_WORK_DIR", "/tmp"), "logs")
        os.makedirs(logs, exist_ok=True)
        log = open(os.path.join(logs, os.path.basename(argv[0]) + ".log"), "ab")
        kwargs.update(stdout=log, stderr=subprocess.STDOUT)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    process = subprocess.Popen(argv, start_new_session=True, **kwargs)
    journal().add("kill", pid=process.pid)
    return process


def scratch_file(name):
    """A path in the scratch directory, removed at unwind."""
    path = os.path.join(os.environ["IMG_SCRATCH_DIR"], name)
    journal().add("remove", path=path)
    return path


# -- dispatch ----------------------------------------------------------------

def main(run, accepts=None, required_capacity=None):
    """Dispatch the verb the runner passes as the first argument."""
    verb = sys.argv[1] if len(sys.argv) > 1 else "run"
    try:
        if verb == "run":
            run()
        elif verb == "accepts":
            answer = accepts() if accepts else True
            if answer is not True:
                # False or a reason string: decline, saying why.
                print(answer or "declined")
                sys.exit(1)
        elif verb == "required-capacity":
            print(int(required_capacity()) if required_capacity else 0)
        else:
            print(f"unknown verb {verb!r}", file=sys.stderr)
            sys.exit(2)
    except HookFailure as failure:
        _emit({"fail": str(failure)})
        print(str(failure), file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


@contextlib.contextmanager
def undoing(entry_id):
    """Undo a journal entry at the end of a with-block (resources a hook only borrows)."""
    try:
        yield entry_id
    finally:
        journal().undo(entry_id)


def cli(argv=None):
    """`python -m imaging_elements.sdk.hooklib losetup FILE [OFFSET [SIZELIMIT]]`: the
    bash helpers' way to the same code (img_losetup), so both journal first."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "losetup" or not 2 <= len(argv) <= 4:
        print("usage: python -m imaging_elements.sdk.hooklib losetup FILE [OFFSET [SIZELIMIT]]", file=sys.stderr)
        return 2
    try:
        device, _ = losetup(argv[1], int(argv[2]) if len(argv) > 2 else 0,
                            int(argv[3]) if len(argv) > 3 and argv[3] else None)
    except (HookFailure, ValueError) as exc:
        print(f"img_losetup: {exc}", file=sys.stderr)
        return 1
    print(device)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
