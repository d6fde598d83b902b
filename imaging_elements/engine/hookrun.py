"""Running one hook: start it in its own process group, read its output and
its status channel (JSON lines on $IMG_STATUS_FD, docs/hooks.md) with bounded
memory, stop it at its time limit or when the caller cancels."""

import contextlib
import json
import os
import re
import select
import signal
import time
from collections import deque

from imaging_elements.engine.monitor import clean

OUTPUT_TAIL = 20
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Bounds on what a hook (or a guest behind it) can make the runner hold or print.
MAX_LINE = 8192        # bytes of one output or status line; the rest of the line is dropped
MAX_MESSAGE = 2000     # characters of one describe/warn/fail text
MAX_DESCRIBE, MAX_WARN = 20, 100
MAX_VALUE = 4096       # characters of a value a hook sets
MAX_LOGGED = 10000     # output lines of one hook in the log; then only its last lines are kept
PROGRESS_EVERY = 0.1   # seconds between two progress events of one hook


class HookStartError(Exception):
    """The hook could not be started at all."""


class LineReader:
    """Split a byte stream into lines of at most MAX_LINE bytes, holding no more."""

    def __init__(self):
        self.buffer, self.cut = bytearray(), False

    def feed(self, data):
        lines, start = [], 0
        while (end := data.find(b"\n", start)) >= 0:
            self._add(data[start:end])
            lines.append(self.flush())
            start = end + 1
        self._add(data[start:])
        return lines

    def _add(self, data):
        room = MAX_LINE - len(self.buffer)
        if len(data) > room:
            self.cut = True
        self.buffer += data[:max(room, 0)]

    def pending(self):
        return bool(self.buffer) or self.cut

    def flush(self):
        line = bytes(self.buffer) + (b" [line cut]" if self.cut else b"")
        self.buffer, self.cut = bytearray(), False
        return line


def may_set(name, value, settable=(), protected=()):
    """None if a host hook may set `name` to `value`, else why not.  settable: names
    its phase may set although they are `protected` (the runner's or the operator's)."""
    if not isinstance(name, str) or not name.startswith("IMG_") or not VAR_NAME.match(name):
        return "only IMG_* variables (letters, digits, _)"
    if not isinstance(value, str) or len(value) > MAX_VALUE or "\0" in value:
        return f"the value must be a string of at most {MAX_VALUE} characters"
    if name in settable:
        return None
    if name in protected:
        return "the runner's or the operator's setting"
    return None


class Channel:
    """What one hook says on its status channel and its output, checked, never
    trusted: a bad line is a warning naming the hook.

    warn(text): a warning event.  variables: the dict a `set` line changes,
    refuse(name, value) -> None or why not.  inside: the hook runs inside the
    image (it may set nothing)."""

    def __init__(self, monitor, warn, phase, hook, variables, refuse, inside=False):
        self.monitor, self._warn = monitor, warn
        self.phase, self.hook = phase, hook
        self.variables, self.refuse, self.inside = variables, refuse, inside
        self.describe, self.warnings_said, self.fail, self.bad_input = [], [], None, False
        self.warnings = self.lines = 0
        self.progress_at = 0
        self.where = f"{phase}/{hook.name} ({hook.element})"

    def warn(self, text):
        """A warning about what the hook sent; after MAX_WARN of them, one last note."""
        self.warnings += 1
        if self.warnings <= MAX_WARN:
            self._warn(text)
        elif self.warnings == MAX_WARN + 1:
            self._warn(text.split(":", 1)[0] + f": more than {MAX_WARN} warnings; the rest are not shown")

    def output(self, text, tail):
        text = clean(text)
        tail.append(text)
        self.lines += 1
        if self.lines <= MAX_LOGGED:
            self.monitor.event("log", level="INFO", message=f"{self.hook.name}: {text}")
        elif self.lines == MAX_LOGGED + 1:
            self._warn(f"{self.where}: more than {MAX_LOGGED} lines "
                       "of output; the rest are not logged (the last lines are kept)")

    def message(self, text):
        """One status line."""
        where = self.where
        try:
            message = json.loads(text)
            if not isinstance(message, dict) or len(message) != 1:
                raise ValueError("not an object with one key")
            (kind, value), = message.items()
        except (ValueError, RecursionError):
            self.warn(f"{where}: not a status line: {clean(text[:200])!r}")
            return
        if kind in ("describe", "warn", "fail", "bad-input"):
            if not isinstance(value, (str, int, float)):
                self.warn(f"{where}: status {kind}: the value must be a string")
                return
            value = clean(str(value))[:MAX_MESSAGE]
            if kind == "describe" and len(self.describe) < MAX_DESCRIBE:
                self.describe.append(value)
            elif kind == "warn" and len(self.warnings_said) < MAX_WARN:
                self.warnings_said.append(value)
                self.warn(f"{self.phase}/{self.hook.name}: {value}")
            elif kind in ("fail", "bad-input"):
                self.fail, self.bad_input = value, kind == "bad-input"
        elif kind == "progress":
            done, total = (value.get("done"), value.get("total")) if isinstance(value, dict) else (None, None)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (done, total)) \
                    or set(value) != {"done", "total"} or total == 0:
                self.warn(f"{where}: status progress: give {{\"done\": N, \"total\": N}} with "
                          f"whole numbers, total above 0, not {clean(text[:200])!r}")
                return
            now = time.monotonic()
            if now - self.progress_at >= PROGRESS_EVERY or done >= total:
                self.progress_at = now  # a flood of progress lines is not a flood of events
                self.monitor.event("progress", phase=self.phase, hook=self.hook.name, done=min(done, total),
                                   total=total)
        elif kind == "set" and isinstance(value, dict):
            if self.inside:
                self.warn(f"{where}: runs inside the image and may not set variables; "
                          f"ignored: {clean(', '.join(map(str, value))[:200])}")
                return
            for name, setting in value.items():
                problem = self.refuse(name, setting)
                if problem:
                    self.warn(f"{where}: may not set {clean(str(name)[:100])}: {problem}; ignored")
                else:
                    self.variables[name] = setting
        else:
            self.warn(f"{where}: unknown status line {clean(text[:200])!r}")


class Child:
    """A hook started by spawn(): the part of subprocess.Popen that follow() and stop()
    use (pid, returncode, stdout, poll, wait), without importing subprocess, which
    costs every 1-hook process about 2 ms of start-up (docs/packaging.md)."""

    def __init__(self, pid, stdout):
        self.pid, self.stdout, self.returncode = pid, stdout, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _inheritable_fds():
    """This process's inheritable descriptors above stderr (ones its own parent passed
    it): a hook gets none of them, as Popen's close_fds did."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone
                if os.get_inheritable(fd):
                    fds.append(fd)
    return fds


def spawn(argv, env):
    """Start a hook in a process group of its own (a session: setsid), stdin
    /dev/null, stdout and stderr on one pipe, the status channel's write end as
    $IMG_STATUS_FD.  Returns (Child, status read fd).

    posix_spawn: the status fd is passed by dup2 onto itself, which clears its
    close-on-exec flag in the child only (glibc), so that a hook started by
    another thread at the same time never gets it."""
    status_read, status_write = os.pipe()
    out_read, out_write = os.pipe()
    env = {**env, "IMG_STATUS_FD": str(status_write)}
    actions = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()]
    actions += [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_write, 1), (os.POSIX_SPAWN_DUP2, out_write, 2),
                (os.POSIX_SPAWN_DUP2, status_write, status_write)]
    try:
        start = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
        # The signals Python ignores back at their defaults, as Popen's restore_signals.
        pid = start(argv[0], argv, env, file_actions=actions, setsid=True,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except OSError as exc:
        os.close(status_read)
        os.close(out_read)
        raise HookStartError(str(exc)) from exc
    finally:
        os.close(status_write)
        os.close(out_write)
    return Child(pid, open(out_read, "rb", buffering=0)), status_read


class TimedOut(Exception):
    pass


def run(argv, env, channel, limit, cancel_point=lambda: None, redact=str, journal=None):
    """Run one hook to its end: spawn() it, record its process group in `journal` (a
    `kill` entry, so that even a SIGKILLed runner's --cleanup stops it), follow() it,
    and stop it if anything interrupts the wait.  Returns (exit code, its last lines);
    raises HookStartError, TimedOut, or what cancel_point() raises."""
    process, status_read = spawn(argv, env)
    try:
        entry = journal.add("kill", pid=process.pid, group=True) if journal else None
    except BaseException:
        stop(process)
        os.close(status_read)
        process.stdout.close()
        raise
    try:
        tail = follow(process, status_read, channel, limit, cancel_point, redact)
    finally:
        if process.poll() is None:  # interrupted: stop it before anything else unwinds
            stop(process)
        if entry:
            journal.done(entry)
    return process.returncode, tail


def follow(process, status_read, channel, limit, cancel_point, redact=str):
    """Relay the hook's output and status lines until it ends; returns its last lines.

    Calls cancel_point() (which may raise) at least every 0.2 s; stops the hook
    and raises TimedOut after `limit` seconds.  Memory is bounded whatever the
    hook writes: a line is cut at MAX_LINE bytes.  Closes status_read."""
    tail = deque(maxlen=OUTPUT_TAIL)
    readers = {status_read: LineReader(), process.stdout.fileno(): LineReader()}
    deadline = time.monotonic() + limit
    poller = select.poll()  # not selectors: its import is start-up every 1-hook process pays
    for fd in readers:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    open_fds = set(readers)

    def line(fd, raw):
        text = redact(raw.decode(errors="replace"))
        if fd == status_read:
            channel.message(text)
        else:
            channel.output(text, tail)

    try:
        while open_fds:
            cancel_point()
            if time.monotonic() > deadline:
                stop(process)
                raise TimedOut(f"{channel.where} killed: it ran longer "
                               f"than the hook time limit of {limit:g} s (--hook-timeout)")
            exited = process.poll() is not None
            ready = poller.poll(0 if exited else 200)
            if exited and not ready:
                break  # a daemon the hook started keeps the pipes open
            for fd, _ in ready:
                data = os.read(fd, 65536)
                if not data:  # end of file (POLLHUP with nothing left to read)
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                for raw in readers[fd].feed(data):
                    line(fd, raw)
        for fd, reader in readers.items():
            if reader.pending():
                line(fd, reader.flush())
        process.wait()
    finally:
        os.close(status_read)
        process.stdout.close()
    return list(tail)


def stop(process):
    """SIGTERM the process group, then SIGKILL it after 5 s.  Only poll() of
    `process` is used: a Child or a subprocess.Popen."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + 5
        while process.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return


def collect(process, stream, check):
    """Wait for `process`, calling check() every 0.2 s; its last 64 KiB of `stream`."""
    import subprocess  # here: hooks are started without it (spawn)
    import selectors  # here: hooks are followed without it (follow)
    kept = b""
    os.set_blocking(stream.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            check()
            if selector.select(timeout=0.2):
                data = os.read(stream.fileno(), 65536)
                if not data:
                    break
                kept = (kept + data)[-65536:]
    while True:
        try:
            process.wait(timeout=0.2)
            return kept
        except subprocess.TimeoutExpired:
            check()


def run_tool(argv, check=lambda: None, env=None):
    """Run a short host command, stopping it if check() raises; (exit code, stderr bytes)."""
    import subprocess  # here: hooks are started without it (spawn)
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        errors = collect(process, process.stderr, check)
    finally:
        if process.poll() is None:  # cancelled: stop it first
            stop(process)
        process.stderr.close()
    return process.returncode, errors


def said(text):
    """(exit code, words) of a hook's failure text: its status line's `fail` (1) or
    `bad-input` (3) once, in words, if it wrote one (a hook run outside the status
    channel prints the line and then the same words)."""
    for line in text.splitlines():
        for kind, code in (("fail", 1), ("bad-input", 3)):
            start = line.find(f'{{"{kind}"')
            if start >= 0:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    return code, clean(str(json.loads(line[start:])[kind])[:MAX_MESSAGE])
    return 1, clean(text[:MAX_MESSAGE])
