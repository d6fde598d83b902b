"""Run a host tool (qemu-img, qemu-storage-daemon, qemu-system) confined to
the files it is given.

Images come from strangers, and a qemu block driver opens whatever the image
names: a backing file, an external data file, VMDK extents.  Re-parsing the
formats ourselves to refuse such names cannot keep up with qemu's parsers, so
each tool that reads an untrusted image runs under bubblewrap where nothing
else exists to be opened:

* a mount namespace holding the runtime (/usr and the /lib links, read-only),
  a private /dev (null, zero, urandom only), /proc, an empty /tmp, and exactly
  the files given, each bound at a fixed name (read-only unless an output);
* no network, IPC, PID or UTS sharing (`--unshare-all`), a new session;
* a user namespace, no capabilities at all, no_new_privs, a clean environment;
* the host uid 65534 (nobody) when the files' modes let it read the inputs
  and write the outputs (outputs we create are handed to it for the run);
  otherwise root's uid inside a user namespace, without any capability;
* resource limits (prlimit: address space, CPU time, processes, file size) with
  defaults a real image never reaches, and a message saying which one was hit.
"""

import contextlib
import os
import shutil
import signal
import subprocess
from collections import namedtuple

NOBODY = 65534
GiB = 1 << 30
# The directory the given files appear in, inside the sandbox.
INSIDE = "/run/confine"


class ConfineError(Exception):
    """The sandbox could not be set up (bwrap missing, a file not found)."""


# Immutable records as named tuples, not dataclasses: importing dataclasses (with
# inspect) costs about 7 ms in every process that confines a tool (docs/packaging.md).

class Limits(namedtuple("Limits", "memory cpu processes file_size", defaults=(4 * GiB, None, 512, None))):
    """Per-process bounds (setrlimit, inherited by the sandbox):
    memory       address space, bytes: qemu reserves thread stacks and caches;
    cpu          seconds of CPU time; None: no bound (conversions of big disks);
    processes    threads and processes of the sandbox's uid;
    file_size    largest file it may write, bytes; None: no bound."""
    __slots__ = ()

    def argv(self, as_nobody):
        """prlimit's arguments (no preexec_fn: callers may be threads)."""
        argv = ["prlimit", f"--as={self.memory}", "--core=0"]
        if self.cpu:
            # SIGXCPU at the soft limit (we name the bound), SIGKILL a second later.
            argv.append(f"--cpu={self.cpu}:{self.cpu + 1}")
        if as_nobody:
            # RLIMIT_NPROC counts every process of the uid: meaningful for nobody only.
            argv.append(f"--nproc={self.processes}")
        if self.file_size:
            argv.append(f"--fsize={self.file_size}")
        return argv + ["--"]


class File(namedtuple("File", "host name write created", defaults=(False, False))):
    """A host file the tool may use, seen inside as INSIDE/name.

    created: an output we made for this run; it is handed to the sandbox's
    uid for the run (chown) and given back after (Sandbox.restore)."""
    __slots__ = ()

    @property
    def inside(self):
        return f"{INSIDE}/{self.name}"


def _runtime_binds():
    binds = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            binds += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            binds += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        binds += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return binds


def _usable_by_nobody(st, write):
    """Whether uid nobody may open the file.  Only its own mode counts: bwrap
    binds it while still root, and inside it sits in bwrap's own directories."""
    bits = 2 if write else 4
    return bool(st.st_mode & (bits << 6 if st.st_uid == NOBODY else bits))


class Sandbox:
    """The argv and the open file descriptors of one confined command.

    Files are opened here (O_PATH) and bound from the descriptor, so the
    sandbox gets the file that was checked even if the name changes later.
    `fd_files`: host descriptors (e.g. an open /dev/fuse) passed in; each is
    also given a regular file at /dev/fd/N, which is what a FUSE daemon is
    told to use as its mount point (see disk.export_raw).
    """

    def __init__(self, argv, files=(), fd_files=(), devices=(), limits=Limits(), chdir=None,
                 daemon=False):
        bwrap = shutil.which("bwrap")
        if not bwrap:
            raise ConfineError("reading untrusted images needs bubblewrap (bwrap), not found on "
                               "PATH: apt-get install bubblewrap")
        self.limits = limits
        self.fds, self.handed = [], []
        try:
            binds, opened = [], []
            for f in files:
                try:
                    fd = os.open(f.host, os.O_PATH | os.O_CLOEXEC)
                except OSError as exc:
                    raise ConfineError(f"{f.host}: cannot open: {exc.strerror}") from exc
                self.fds.append(fd)
                opened.append((f, os.fstat(fd)))
                binds += ["--bind-fd" if f.write else "--ro-bind-fd", str(fd), f.inside]
            # /dev/kvm is for group kvm: a tool that needs a device keeps root's uid.
            usable = not devices and all(_usable_by_nobody(st, f.write and not f.created)
                                         for f, st in opened)
            if usable:
                for f, st in opened:
                    if f.created:
                        os.chown(f.host, NOBODY, NOBODY)
                        self.handed.append((f.host, st.st_uid, st.st_gid))
            for device in devices:
                binds += ["--dev-bind", device, device]
            if fd_files:
                binds += ["--perms", "0755", "--dir", "/dev/fd"]
            for fd in fd_files:
                # A regular file at /dev/fd/N: libfuse takes the number from the name.
                binds += ["--perms", "0444", "--ro-bind-data", str(self._empty()), f"/dev/fd/{fd}"]
            self.pass_fds = tuple(self.fds) + tuple(fd_files)
            self.as_nobody = usable
            # A tool dies with its caller, in its own session (no terminal to
            # inject into).  A daemon outlives the hook that starts it: it is
            # started in a session of its own and killed as a process group.
            lifetime = [] if daemon else ["--die-with-parent", "--new-session"]
            if usable:
                # bwrap, as root, sets the sandbox up; setpriv then becomes host uid
                # nobody, with no capability left (bwrap kept only these three for it).
                identity = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                            "--cap-add", "CAP_SETPCAP"]
                command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
            else:
                # A user namespace whose only uid is root's, without any capability.
                identity = ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
                            "--cap-drop", "ALL"]
                command = list(argv)
            self.argv = limits.argv(usable) + [
                bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", *identity, *lifetime, "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LC_ALL", "C.UTF-8",
                *_runtime_binds(),
                "--tmpfs", "/dev", "--dev-bind", "/dev/null", "/dev/null",
                "--dev-bind", "/dev/zero", "/dev/zero", "--dev-bind", "/dev/urandom", "/dev/urandom",
                "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp", "--dir", INSIDE,
                *binds, "--chdir", chdir or "/", "--", *command]
        except BaseException:
            self.close()
            self.restore()
            raise

    def _empty(self):
        # --ro-bind-data copies from a descriptor into a new file: an empty pipe.
        read, write = os.pipe()
        os.close(write)
        self.fds.append(read)
        return read

    def close(self):
        """Close our copies of the descriptors (once the sandbox has them)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def restore(self):
        """Give the outputs back to their owner (after the tool has exited)."""
        for path, uid, gid in self.handed:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, uid, gid)
        self.handed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        self.restore()


def run(argv, files=(), limits=Limits(), timeout=None, **kwargs):
    """subprocess.run of `argv` confined to `files`; text output captured.
    Returns the CompletedProcess with .limit_hit set (None or which bound)."""
    timed_out = False
    with Sandbox(argv, files, limits=limits) as box, \
            subprocess.Popen(box.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, pass_fds=box.pass_fds,
                             start_new_session=True, **kwargs) as process:
        box.close()
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    result.limit_hit = limit_hit(process.returncode, stderr, limits, timeout if timed_out else None)
    return result


def popen(argv, files=(), devices=(), limits=Limits(), daemon=False, **kwargs):
    """subprocess.Popen of `argv` confined to `files` (and `devices`, e.g.
    /dev/kvm).  Not a daemon: it dies with its caller (bwrap --die-with-parent),
    and killing the returned process (bwrap) kills it.  No created outputs
    (their owner would be given back at once)."""
    if any(f.created for f in files):
        raise ValueError("a started process's files must exist before it starts")
    with Sandbox(argv, files, fd_files=kwargs.pop("fd_files", ()), devices=devices, limits=limits,
                 daemon=daemon) as box:
        return subprocess.Popen(box.argv, pass_fds=box.pass_fds, **kwargs)


def spawn_daemon(argv, files=(), fd_files=(), limits=Limits(), **kwargs):
    """Like popen, for a daemon that outlives the hook that starts it: the leader
    of its own process group, which the caller journals at once
    ("kill", pid, group=True)."""
    return popen(argv, files, limits=limits, daemon=True, fd_files=fd_files,
                 start_new_session=True, **kwargs)


def signal_of(returncode):
    """The signal that ended the confined tool, or None (bwrap exits 128+N for it)."""
    if returncode is None or returncode == 0:
        return None
    if returncode < 0:
        return -returncode
    return returncode - 128 if 128 < returncode < 128 + 65 else None


def limit_hit(returncode, stderr, limits, timeout=None):
    """Which bound stopped the tool, in words, or None."""
    if timeout is not None:
        return f"it ran longer than the time limit of {timeout} s"
    sig = signal_of(returncode)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and limits.cpu):
        return f"it hit the CPU-time limit of {limits.cpu} s"
    if sig == signal.SIGXFSZ:
        return f"it hit the file-size limit of {limits.file_size} bytes"
    text = stderr or ""
    memory = f"the memory limit of {limits.memory >> 20} MiB"
    if returncode and ("annot allocate memory" in text or "failed to allocate" in text
                       or "Could not allocate" in text or "Out of memory" in text):
        return f"it hit {memory}"
    if returncode and "Resource temporarily unavailable" in text and "thread" in text.lower():
        # A thread's stack that does not fit looks the same as one thread too many.
        return f"it hit {memory} or the limit of {limits.processes} processes"
    return None
