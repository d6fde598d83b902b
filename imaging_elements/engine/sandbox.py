"""Running a command inside the mounted image, in a sandbox that holds against root inside it.

Everything that runs here comes from the image and is hostile.  See
docs/security.md for the properties and what enforces each one.  In short:

* The runner starts this file as a small launcher (`wrap()`): stdlib only, run
  with `python -I`, so nothing of the hook environment steers it.
* The launcher, as host root, makes two user namespaces (OUTER maps 0-65535 to
  the unprivileged host ids SANDBOX_UID..+65535; INNER is a child of OUTER with
  the identity map) and, in a mount namespace of its own (its mounts vanish
  with it), stages on a tmpfs over /run: an idmapped (through OUTER), nodev,
  nosuid clone of the image root, so that the guest's root owns the image's
  root files while being host uid SANDBOX_UID; binds of lib/ and the hook SDK;
  a copy of the hook.
* bubblewrap, started as host uid SANDBOX_UID, enters OUTER (`--userns`),
  builds the sandbox from the staged tree (mount, PID, IPC, UTS, network,
  cgroup namespaces; private /dev, /proc, size-limited /tmp and /run), then
  switches to INNER (`--userns2`): the mounts and the PID namespace belong to
  OUTER, so the guest can change none of them.  Its capabilities are the few
  needed to own files (FILE_CAPS), in INNER only; a seccomp filter refuses
  namespace, mount, key, BPF, module and tracing calls; no_new_privs is set.
* Bounds: a memory and a pids cgroup (v1, under the caller's own) when the
  controllers are there, and rlimits (processes, address space without the
  memory cgroup, CPU time, file size, no core dumps).  A bound that was hit is
  told by the launcher's exit status (`exit_reason()`).
"""

import ctypes
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys

from imaging_elements.engine.resources import LIB, SDK

INSIDE = "/run/img"
HOSTNAME = "imaging-sandbox"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Variables that name host things (paths, the journal, the runner's own settings): never
# given to code that runs from the image, in this sandbox or in a booted instance.
HOST_PATHS = frozenset((
    "IMG_JOURNAL", "IMG_JOURNAL_SCOPE", "IMG_WORK_DIR", "IMG_SCRATCH_DIR", "IMG_ELEMENT_DIR", "TMPDIR",
    "IMG_IMAGE", "IMG_INPUT", "IMG_OUTPUT", "IMG_KERNEL", "IMG_RAMDISK", "IMG_CONVERT_OUTPUT", "IMG_DISK",
    "IMG_MOUNT_POINT", "IMG_LIB", "IMG_PYTHON", "IMG_INSPECTION_REPORT", "IMG_ELEMENTS_PATH",
    "IMG_LOG_FILE", "IMG_EVENTS_FILE", "IMG_EVENTS_FD", "IMG_CLEANUP", "IMG_RESULT_JSON",
    "IMG_SANDBOX_LIMITS", "IMG_SCRATCH_LIMIT", "IMG_BREAK", "IMG_KEEP_WORK_DIR"))

# Host uids and gids SANDBOX_UID..SANDBOX_UID+65535 are the guest's 0..65535:
# a range no host account uses (far above any /etc/subuid allocation).
SANDBOX_UID = 3_000_000_000
ID_COUNT = 65536

# Capabilities the guest's root keeps, in its own user namespace only: enough
# to own, change and chown the image's files (package installs, editing a 0000
# /etc/shadow).  They act only on inodes whose owners map into the sandbox (the
# image's, through the idmapped mount), never on the host's.
FILE_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
             "CAP_SETUID", "CAP_SETGID", "CAP_KILL")

MiB = 1024 * 1024
# Defaults no real install hook reaches; see docs/security.md.
LIMITS = {
    "memory": 4096 * MiB,      # the sandbox's whole process tree (cgroup), or per process (RLIMIT_AS)
    "processes": 4096,         # tasks in the sandbox (pids cgroup and RLIMIT_NPROC)
    "cpu": 3600,               # CPU seconds per process (RLIMIT_CPU)
    "file_size": 64 * 1024 * MiB,  # largest file written (RLIMIT_FSIZE)
    "tmpfs": 1024 * MiB,       # each of /tmp and /run
}

# Exit codes of the launcher that say a bound was hit; the guest's own exit codes
# at or above EXIT_GUEST_HIGH are reported as EXIT_GUEST_HIGH, so these cannot be forged.
EXIT_GUEST_HIGH = 240
BOUND_EXITS = {241: "memory", 242: "processes", 243: "CPU time", 244: "file size",
               245: "sandbox setup"}
BOUND_TEXT = {"memory": "memory", "processes": "processes", "CPU time": "cpu", "file size": "file_size"}

# x86_64 syscall numbers
SYS = {"unshare": 272, "setns": 308, "clone": 56, "clone3": 435, "mount": 165, "umount2": 166,
       "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430,
       "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
       "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
       "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
       "finit_module": 313, "delete_module": 176, "ptrace": 101, "process_vm_readv": 310,
       "process_vm_writev": 311, "iopl": 172, "ioperm": 173, "swapon": 167, "swapoff": 168,
       "reboot": 169, "acct": 163, "syslog": 103, "lookup_dcookie": 212, "open_by_handle_at": 304,
       "name_to_handle_at": 303, "personality": 135, "quotactl": 179, "quotactl_fd": 443,
       "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
       "pidfd_getfd": 438, "kcmp": 312, "fanotify_init": 300, "vhangup": 153, "mknod": 133,
       "mknodat": 259, "listmount": 458, "statmount": 457, "open_tree_attr": 467}
SECCOMP_DENIED = ("unshare", "setns", "mount", "umount2", "pivot_root", "open_tree", "move_mount",
                  "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "open_tree_attr",
                  "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                  "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
                  "ptrace", "process_vm_readv", "process_vm_writev", "iopl", "ioperm", "swapon",
                  "swapoff", "reboot", "acct", "syslog", "lookup_dcookie", "open_by_handle_at",
                  "name_to_handle_at", "quotactl", "quotactl_fd", "io_uring_setup",
                  "io_uring_enter", "io_uring_register", "pidfd_getfd", "kcmp", "fanotify_init",
                  "vhangup", "listmount", "statmount")
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
CLONE_NAMESPACES = 0x02000000 | 0x04000000 | 0x08000000 | CLONE_NEWUSER | 0x20000000 | 0x40000000 \
    | CLONE_NEWNS | 0x00000080  # cgroup, uts, ipc, user, pid, net, mount, time


class SandboxError(Exception):
    pass


# -- what the runner calls ----------------------------------------------------------

def wrap(root, argv, binds=(), writable=True, interactive=False, limits=None):
    """The argv that runs `argv` (paths as seen inside) in a sandbox rooted at `root`.

    binds: (host path, path inside) pairs bound read-only.  limits: overrides
    of LIMITS.  Checks what can be checked before anything runs.
    """
    if platform.machine() != "x86_64":
        raise SandboxError(f"hooks inside the image need an x86_64 host (its system call filter "
                           f"is x86_64's), not {platform.machine()}")
    if not shutil.which("bwrap"):
        raise SandboxError("running hooks inside the image needs bubblewrap (bwrap), "
                           "not found on PATH: apt-get install bubblewrap")
    if not os.path.isdir(root):
        raise SandboxError(f"{root}: the image is not mounted (no mount.d hook mounted it)")
    for host in (LIB, SDK):
        _check_readable(host)
    # The hook SDK only (stdlib-only: it runs on the guest's Python), never the engine or a
    # class library.  Its side-effect-free __init__ makes imaging_elements/ a regular package
    # there too, so that first on PYTHONPATH it wins over any copy the image holds.
    package = f"{INSIDE}/python/imaging_elements"
    binds = [(LIB, f"{INSIDE}/lib"), (SDK, f"{package}/sdk"),
             (os.path.join(SDK, "__init__.py"), f"{package}/__init__.py")] + list(binds)
    spec = {"root": root, "argv": list(argv), "binds": binds, "writable": bool(writable),
            "interactive": bool(interactive), "limits": dict(LIMITS, **(limits or {}))}
    # -I: the environment (meant for the guest) cannot steer the launcher.
    return [sys.executable, "-I", os.path.abspath(__file__), json.dumps(spec)]


def hook_argv(root, hook, verb="run", writable=True, limits=None):
    """Run `hook` inside the image: its file is bound at /run/img/hooks/NAME."""
    inside = f"{INSIDE}/hooks/{hook.name}"
    # The guest's own interpreter runs it, chosen by the shebang.
    return wrap(root, [inside, verb], binds=[(hook.path, inside)], writable=writable, limits=limits)


def parse_limits(items):
    """["memory=512M,processes=100", "cpu=60"] (or one such string) -> LIMITS with those changed."""
    from imaging_elements.engine import config  # not at the top: the launcher runs stdlib only
    limits = dict(LIMITS)
    if isinstance(items, str):
        items = [items]
    for item in ",".join(items or ()).split(","):
        if not item.strip():
            continue
        name, sep, value = item.strip().partition("=")
        key = name.strip().replace("-", "_")
        if not sep or key not in LIMITS:
            raise ValueError(f"{item.strip()!r}: use NAME=VALUE with NAME one of "
                             + ", ".join(k.replace("_", "-") for k in LIMITS))
        try:
            number = config.parse_size(value) if key in ("memory", "file_size", "tmpfs") else \
                int(value) if value.strip().isdigit() else -1
        except ValueError:
            number = -1
        if number <= 0:
            raise ValueError(f"{item.strip()!r}: {value!r} is not a positive "
                             + ("size" if key in ("memory", "file_size", "tmpfs") else "whole number"))
        limits[key] = number
    return limits


def inside_environment(env, allowed_secrets=()):
    """The hook environment as seen inside the sandbox: no host paths, and no
    secret-named variable (config.is_secret_name) unless it is in `allowed_secrets`."""
    from imaging_elements.engine import config  # not at the top: the launcher runs stdlib only
    # Host-side paths mean nothing in there, and tell the guest about the host.
    env = {name: value for name, value in env.items() if name not in HOST_PATHS
           and (not config.is_secret_name(name) or name in allowed_secrets)}
    return dict(env, IMG_LIB=f"{INSIDE}/lib", PYTHONPATH=f"{INSIDE}/python",
                IMG_MOUNT_POINT="/", IMG_PYTHON="python3", PATH=GUEST_PATH)


def exit_reason(returncode, limits=None):
    """Text for a sandboxed command's exit status: which bound stopped it, if one did."""
    limits = limits or LIMITS
    if returncode in BOUND_EXITS:
        what = BOUND_EXITS[returncode]
        if what == "sandbox setup":
            return "the sandbox could not be set up"
        limit = limits[BOUND_TEXT[what]]
        shown = f"{limit // MiB} MiB" if what in ("memory", "file size") else \
            f"{limit} s" if what == "CPU time" else str(limit)
        return f"killed: the sandbox's {what} bound ({shown}) was hit"
    if returncode == EXIT_GUEST_HIGH:
        return f"exit {EXIT_GUEST_HIGH} or more"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def _check_readable(directory):
    """The guest runs as an unprivileged host uid: a directory bound in must be world-readable."""
    if os.stat(directory).st_mode & 0o005 != 0o005:
        raise SandboxError(f"{directory}: must be readable by others to be used inside the sandbox, "
                           "which runs as an unprivileged user: chmod -R o+rX")


# -- the launcher (runs as root on the host, then becomes bubblewrap's parent) -------

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(name, *args):
    result = _libc.syscall(ctypes.c_long(SYS[name]), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _unshare(flags):
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _child_userns(base, owner=None):
    """Fork a child that unshares a user namespace, map its 0..65535 to `base`.. (ids of
    this process's namespace, which must be the new one's parent); an fd on it.

    owner: the uid (and gid) the child takes first, which owns the namespace.
    The child only waits, then exits: the fd keeps the namespace.
    """
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: unshare, say so, wait to be told to exit
        try:
            os.close(go_w)
            os.close(ready_r)
            if owner is not None:
                os.setgroups([])
                os.setresgid(owner, owner, owner)
                os.setresuid(owner, owner, owner)
            _unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError("could not make a user namespace")
        _write(f"/proc/{pid}/uid_map", f"0 {base} {ID_COUNT}\n")
        _write(f"/proc/{pid}/gid_map", f"0 {base} {ID_COUNT}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)


def _user_namespaces():
    """(OUTER fd, INNER fd): OUTER maps 0.. to SANDBOX_UID..; INNER is OUTER's child, identity map."""
    # Owned by SANDBOX_UID, so that bwrap, started as that host uid, may enter it.
    outer = _child_userns(SANDBOX_UID, owner=SANDBOX_UID)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # become OUTER's root, make INNER below it, say which fd holds it
        try:
            os.close(read)
            _syscall("setns", ctypes.c_int(outer), ctypes.c_int(CLONE_NEWUSER))
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            _libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, lost by setresuid: /proc/CHILD/uid_map stays ours
            inner = _child_userns(0)
            os.write(write, f"{inner}\n".encode())
            signal.pause()
        finally:
            os._exit(1)
    os.close(write)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(read, 64)
            if not chunk:
                raise OSError("could not make the inner user namespace")
            data += chunk
        inner = os.open(f"/proc/{pid}/fd/{int(data)}", os.O_RDONLY)
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return outer, inner


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_RECURSIVE, AT_EMPTY_PATH = 1, 0o2000000, 0x8000, 0x1000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_IDMAP = 0x1, 0x2, 0x4, 0x100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
AT_FDCWD = -100


def _idmap_root(root, userns, writable):
    """An fd on an idmapped (through `userns`), nodev, nosuid detached clone of the tree at `root`."""
    tree = _syscall("open_tree", ctypes.c_int(AT_FDCWD), root.encode(),
                    ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE))
    attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                      | (0 if writable else MOUNT_ATTR_RDONLY), 0, 0, userns)
    try:
        _syscall("mount_setattr", ctypes.c_int(tree), b"", ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
                 ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    except OSError as exc:
        os.close(tree)
        with open("/proc/self/mounts") as mounts:
            fstypes = sorted({line.split()[2] for line in mounts
                              if line.split()[1] == root or line.split()[1].startswith(root + "/")})
        raise SandboxError(f"the image's filesystems ({', '.join(fstypes)}) cannot be mapped to "
                           f"the sandbox's unprivileged user ({exc.strerror}): no hook can run inside "
                           "this image (that needs ext2/3/4, xfs or btrfs, not FUSE)") from exc
    return tree


STAGE = "/run"  # in the launcher's own mount namespace only: a tmpfs bwrap's uid can walk


def _stage(spec, outer):
    """Put the idmapped image root and the binds where bwrap, an unprivileged host uid, can
    reach them (the work directory is 0700): binds on a tmpfs over STAGE.  Returns the
    spec with those paths."""
    tree = _idmap_root(spec["root"], outer, spec["writable"])
    sources = [os.open(host, os.O_RDONLY | os.O_CLOEXEC) for host, _ in spec["binds"]]
    _syscall("mount", b"tmpfs", STAGE.encode(), b"tmpfs", ctypes.c_ulong(MS_NODEV | MS_NOSUID),
             b"mode=0755,size=16m")
    staged = dict(spec, root=f"{STAGE}/root", binds=[])
    os.mkdir(staged["root"])
    _syscall("move_mount", ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD), staged["root"].encode(),
             ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    os.close(tree)
    for number, (fd, (_, inside)) in enumerate(zip(sources, spec["binds"])):
        target = f"{STAGE}/bind{number}"
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(target)
            _syscall("mount", f"/proc/self/fd/{fd}".encode(), target.encode(), None,
                     ctypes.c_ulong(MS_BIND | MS_REC), None)
        else:
            # A file (the hook) is copied: a snapshot the guest can read and run, whatever
            # its mode on the host, and no later change of the host file reaches in.
            with open(f"/proc/self/fd/{fd}", "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(target, 0o555)
        os.close(fd)
        staged["binds"].append((target, inside))
    return staged


def _seccomp_filter():
    """A classic BPF program for bwrap --seccomp: EPERM for SECCOMP_DENIED, for clone
    with namespace flags, and for any non-x86_64 system call; ENOSYS for clone3
    (its flags cannot be inspected, and libc falls back to clone)."""
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    jset = 0x45  # BPF_JMP|BPF_JSET|BPF_K
    allow, eperm, enosys = 0x7fff0000, 0x00050000 | 1, 0x00050000 | 38
    audit_x86_64, x32 = 0xc000003e, 0x40000000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_x86_64), (ret, 0, 0, eperm), (ld, 0, 0, 0),
            (0x35, 0, 1, x32), (ret, 0, 0, eperm)]  # BPF_JGE: x32 ABI numbers
    for name in SECCOMP_DENIED:
        prog += [(jeq, 0, 1, SYS[name]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, SYS["clone3"]), (ret, 0, 0, enosys)]
    prog += [(jeq, 0, 3, SYS["clone"]), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NAMESPACES), (ret, 0, 0, eperm)]
    prog += [(ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _cgroup(controller, name, settings):
    """A cgroup v1 `controller` group `name` under this process's own, with settings; None
    when the controller is not mounted or cannot be used."""
    base = f"/sys/fs/cgroup/{controller}"
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line.rstrip("\n").split(":", 2)[2] for line in f
                       if controller in line.split(":", 2)[1].split(","))
        parent = base + own
        _remove_stale_cgroups(parent)
        path = os.path.join(parent, name)
        os.mkdir(path)
    except (OSError, StopIteration):
        return None
    try:
        for key, value in settings.items():
            _write(os.path.join(path, key), str(value))
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _remove_stale_cgroups(parent):
    """Empty groups of launchers that were killed (SIGKILL leaves them)."""
    for entry in os.listdir(parent):
        pid = entry.removeprefix("imaging-sandbox-")
        if pid != entry and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(os.path.join(parent, entry))
            except OSError:
                pass  # still in use, or another launcher got there first


def _remove_cgroup(path):
    """Kill what is left in it (nothing, normally: the PID namespace died with bwrap), then remove it."""
    for _ in range(500):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split() if int(p) != os.getpid()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except OSError:
            import time
            time.sleep(0.01)  # its last processes are still being reaped


def _read_key(path, name, key):
    try:
        with open(os.path.join(path, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except OSError:
        pass
    return 0


def _set_rlimits(limits, memory_cgroup, pids_cgroup):
    """Per-process bounds, inherited by the guest, which cannot raise them.  Where a cgroup
    bounds the whole tree, its rlimit is only a backstop (the cgroup counts what it stopped)."""
    import resource
    soft = {resource.RLIMIT_NPROC: limits["processes"] * (2 if pids_cgroup else 1),
            resource.RLIMIT_CORE: 0, resource.RLIMIT_CPU: limits["cpu"],
            resource.RLIMIT_FSIZE: limits["file_size"]}
    if not memory_cgroup:
        soft[resource.RLIMIT_AS] = limits["memory"]
    for which, value in soft.items():
        # CPU: SIGXCPU at the soft limit, SIGKILL 5 s later for a guest that ignores it.
        resource.setrlimit(which, (value, value + 5 if which == resource.RLIMIT_CPU else value))


def _bwrap_argv(spec, outer, inner, seccomp):
    limits = spec["limits"]
    argv = [shutil.which("bwrap"), "--userns", str(outer), "--userns2", str(inner),
            "--uid", "0", "--gid", "0", "--seccomp", str(seccomp),
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup",
            "--die-with-parent", "--hostname", HOSTNAME,
            "--bind" if spec["writable"] else "--ro-bind", spec["root"], "/",
            "--dev", "/dev", "--proc", "/proc",
            "--size", str(limits["tmpfs"]), "--tmpfs", "/tmp",
            "--size", str(limits["tmpfs"]), "--tmpfs", "/run",
            "--cap-drop", "ALL"]
    for cap in FILE_CAPS:
        argv += ["--cap-add", cap]
    for host, inside in spec["binds"]:
        argv += ["--ro-bind", host, inside]
    if not spec["interactive"]:
        argv.append("--new-session")  # no TIOCSTI into the caller's terminal
    return argv + ["--chdir", "/", "--"] + spec["argv"]


def _launch(spec):
    """Set up, run bubblewrap, wait; the exit code (see BOUND_EXITS)."""
    limits = spec["limits"]
    tag = f"imaging-sandbox-{os.getpid()}"
    memory = _cgroup("memory", tag, {"memory.limit_in_bytes": limits["memory"],
                                     "memory.memsw.limit_in_bytes": limits["memory"]}) \
        or _cgroup("memory", tag, {"memory.limit_in_bytes": limits["memory"]})
    pids = _cgroup("pids", tag, {"pids.max": limits["processes"]})
    try:
        try:
            _set_rlimits(limits, memory, pids)
            # Our own mount namespace: the idmapped mount is seen by nobody else and
            # goes away with us, whatever happens.
            _unshare(CLONE_NEWNS)
            _syscall("mount", b"none", b"/", None, ctypes.c_ulong(MS_PRIVATE | MS_REC), None)
            outer, inner = _user_namespaces()
            staged = _stage(spec, outer)
            seccomp_r, seccomp_w = os.pipe()
            os.write(seccomp_w, _seccomp_filter())
            os.close(seccomp_w)
        except (OSError, SandboxError) as exc:
            sys.stderr.write(f"sandbox: {exc}\n")
            return 245
        argv = _bwrap_argv(staged, outer, inner, seccomp_r)
        fds = (outer, inner, seccomp_r)
        # bwrap itself runs as the unprivileged host uid that OUTER maps to the guest's root.
        # close_fds=False: what the caller handed us (its status pipe) goes on to the guest.
        for fd in fds:
            os.set_inheritable(fd, True)
        process = subprocess.Popen(argv, close_fds=False, user=SANDBOX_UID, group=SANDBOX_UID,
                                   extra_groups=[])
        for fd in fds:
            os.close(fd)
        signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
        signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches bwrap too (not SIG_IGN: exec keeps it)
        code = process.wait()
        if code == 0:
            return 0
        if memory and _read_key(memory, "memory.oom_control", "oom_kill"):
            return 241
        if pids and _read_key(pids, "pids.events", "max"):
            return 242
        # CPU time and file size are told by the signal that the rlimit sends: a guest may
        # fake them, to no gain (it fails either way).  The cgroups' counters cannot be faked.
        if code == 128 + signal.SIGXCPU:
            return 243
        if code == 128 + signal.SIGXFSZ:
            return 244
        return min(code, EXIT_GUEST_HIGH) if code > 0 else 128 - code
    finally:
        for path in (memory, pids):
            if path:
                _write(os.path.join(os.path.dirname(path), "cgroup.procs"), str(os.getpid()))
                _remove_cgroup(path)


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))
