"""Calling system tools from library code, and saying whose fault a failure is.

* `run(argv, ...)`: one system tool (blkid, sfdisk, mkfs, losetup, hivexsh, ...)
  run through `sh`, with a timeout, output as text or bytes, and a `ToolError`
  naming the tool, its exit code and the end of its stderr.  A process that
  needs what `sh` does not give (passed file descriptors, its own process
  group, the bwrap sandbox) stays on subprocess: confine.py, sandbox.py,
  hookrun.py, runner.py, instance.py, and the FUSE mount in mount/disk.py.
* `BadInput`: a marker for errors that are the input's fault (damaged,
  truncated, unreadable, hostile), not the host's; `hooklib.bad_input(reason)` stops a
  hook with status `bad-input`, so the process exits 3 (docs/configuration.md).

docs/writing-elements.md ("Calling system tools from library code") has the rules.
"""

import collections
import contextlib
import os
import threading
import time

from imaging_elements.sdk import hooklib
from imaging_elements.sdk.journal import SYSTEM_PATH

TIMEOUT = 600  # seconds: no plain tool call on an image takes longer; a hung one is killed
TAIL = 5       # stderr lines kept in a ToolError
# For tools whose output we parse: messages in English, nothing of the caller's shell.
CLEAN_ENV = {"PATH": SYSTEM_PATH, "LC_ALL": "C"}

Result = collections.namedtuple("Result", "code stdout stderr")


class ToolError(hooklib.HookFailure):
    """A system tool failed, timed out or is missing: the message names the tool, its exit
    code and the end of its stderr.  A HookFailure, so a hook that lets it through fails
    with these words (hooklib.main)."""

    def __init__(self, message, tool, code=None, stderr=""):
        super().__init__(message)
        self.tool, self.code, self.stderr = tool, code, stderr


class _TimedOut(Exception):
    pass


def _watch(running, timeout, check, stopped, why):
    """Until `stopped`: kill the tool at the timeout, or when check() raises (its exception
    goes to `why`, for the caller's thread to raise)."""
    deadline = time.monotonic() + timeout
    while not stopped.wait(min(0.05 if check else timeout, max(deadline - time.monotonic(), 0))):
        try:
            if time.monotonic() >= deadline:
                raise _TimedOut()
            if check:
                check()
        except BaseException as exc:
            why.append(exc)
            _kill(running)
            return


def _kill(running):
    with contextlib.suppress(Exception):
        running.kill()
        running.wait()


def tail(text, lines=TAIL):
    """The last `lines` non-empty lines of a tool's output, joined by ' / '."""
    return " / ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def run(argv, what=None, *, ok=(0,), timeout=TIMEOUT, env=None, input=None, binary=False,
        cwd=None, preexec_fn=None, check=None):
    """Run the system tool argv[0] with arguments argv[1:] through `sh`: Result(code,
    stdout, stderr), text unless `binary`.  An exit code not in `ok`, a timeout (the
    tool is killed) or a missing tool raises ToolError, its message starting with `what`
    (what the caller was doing, naming the user's file) when given.

    env: the tool's whole environment (e.g. CLEAN_ENV), else the caller's; input: its
    stdin (str or bytes), else /dev/null; preexec_fn: called in the child before the
    exec (e.g. a setrlimit); check: called while the tool runs (every 50 ms): if it
    raises (a cancel), the tool is killed and the exception goes on.  A tool that must
    inherit a descriptor or lead its own process group is no call for this: use
    subprocess (docs/writing-elements.md).
    """
    import sh  # sh 1.14: 30 ms of CPU; paid only by a process that runs a tool
    # sh 1.x's only switch (2.x: _bg_exc=False) for its background thread's report of a
    # tool killed by a signal: a traceback on our stderr, which we turn into a ToolError.
    # A global of sh's module itself (`import sh` gives a wrapper of it).
    sh.Command.__call__.__globals__["RUNNING_TESTS"] = True
    tool, prefix = os.path.basename(str(argv[0])), f"{what}: " if what else ""
    try:
        command = sh.Command(str(argv[0]))
    except sh.CommandNotFound:
        raise ToolError(f"{prefix}{tool}: command not found (is it installed?)", tool) from None
    group = os.getpgrp()

    def child():
        # sh 1.x puts each tool in a process group of its own (a session of its own
        # without _new_session=False): back into ours, so that the runner's kill of a
        # hook's group (hookrun.stop) kills its tools too.
        os.setpgid(0, group)
        if preexec_fn:
            preexec_fn()
    # No pty (sh's default costs a pty pair a call); in the background, so that we
    # wait for it ourselves: a timeout or a cancel (the watcher thread) or an exception
    # from a signal handler (SIGTERM in a hook) kills the tool instead of leaving it
    # running.  Not sh's _timeout nor wait(timeout): they poll every 0.1 s, which a
    # short call pays in full.
    options = {"_tty_out": False, "_new_session": False, "_preexec_fn": child, "_bg": True,
               "_ok_code": list(range(256)), "_in": input if input is not None else open(os.devnull, "rb")}  # noqa: SIM115
    options.update({key: value for key, value in (("_env", env), ("_cwd", cwd)) if value})
    stopped, why = threading.Event(), []
    try:
        done = command(*map(str, argv[1:]), **options)
        watcher = threading.Thread(target=_watch, args=(done, timeout, check, stopped, why), daemon=True)
        watcher.start()
        try:
            done.wait()
            code = done.exit_code
        except sh.SignalException as exc:  # killed by a signal: not an exit code _ok_code covers
            code = -abs(exc.exit_code)
        except BaseException:
            _kill(done)
            raise
        finally:
            stopped.set()
            watcher.join()
        stdout, stderr = done.stdout, done.stderr
    finally:
        if input is None:
            options["_in"].close()
    if why and isinstance(why[0], _TimedOut):
        raise ToolError(f"{prefix}{tool} did not finish in {timeout} s (killed)", tool)
    if why:
        raise why[0]
    words = stderr.decode(errors="replace")
    if code not in ok:
        reason = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        detail = tail(words) or tail(stdout.decode(errors="replace"))
        raise ToolError(f"{prefix}{tool} failed ({reason}){': ' + detail if detail else ''}", tool, code, words)
    if binary:
        return Result(code, stdout, stderr)
    return Result(code, stdout.decode(errors="replace"), words)


class BadInput(Exception):
    """Mixed into an error class: the user's input is at fault (exit 3), not the host."""


def mount_reason(text, device, target):
    """(reason, the host's fault?) of a failed mount(8): its words without our loop
    device and mount point (the user knows neither).  A kernel without the
    filesystem is the host's fault; a refused superblock, the image's."""
    reason = text[text.find("mount: "):] if "mount: " in text else text
    reason = (reason.splitlines() or [""])[0].replace(f"mount: {target}: ", "").replace(f" on {device}", "")
    reason = reason.replace(target, "the mount point").replace(device, "its loop device").strip()
    return reason, "unknown filesystem type" in reason


def report(exc):
    """In a hook: stop for `exc`, as bad input if it is marked so, else as a failure."""
    if isinstance(exc, BadInput):
        hooklib.bad_input(exc)
    hooklib.fail(str(exc))
