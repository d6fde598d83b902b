"""Instance validators: boot a throw-away copy of the image and check it from inside.

`run_phase(hooks, env, journal, emit)` is what the runner calls for the phase
instance-validate.d.  The story (docs/instance-validators.md tells it whole):

1. Overlay.  A qcow2 overlay is laid over the image, which is only ever
   opened read-only: every write of ours and of the guest lands in the
   overlay, deleted at the end.
2. Injection.  qemu-storage-daemon serves the overlay as a writable FUSE
   file; the guest's root filesystem in it is mounted (a loop device at the
   partition's offset, nodev,nosuid) and gets the agent (the element's
   agent/img-agent, a POSIX sh script started by a systemd unit), the hooks,
   lib/img-functions, the secrets a hook declares (needs-secret) and an SSH
   key in root's authorized_keys, as a cloud's node controller injects one.
   Guest paths are resolved inside the image (imaging_elements.guest).
3. Boot.  qemu-system-x86_64 with KVM when KVM really boots a kernel here,
   else TCG; whole disks through their own boot loader, partition (AMI)
   images with -kernel/-initrd read from the image or given.  User-mode
   networking with restrict=on and no port forward: nothing listens on the
   host, and the guest reaches only the built-in DHCP server.  qemu's seccomp
   sandbox is on.
4. The agent waits for the boot to settle, runs each hook (`accepts` first
   when the hook declares it) and reports on the second serial port
   (ttyS1, COM2 for a Windows guest): lines `IMGV TOKEN KIND ...` with base64
   payloads.  Then it powers the instance off.  Every byte of it is the
   guest's: lines, texts, the console, the overlay are bounded here, and only
   describe, warn and fail are taken from a hook's status lines.
5. The host follows the console (ttyS0), the results port and SeaBIOS's debug
   port: a kernel panic, an emergency shell or "no bootable device" ends the
   boot at once, a silent guest at IMG_INSTANCE_TIMEOUT.  qemu is in the
   journal from the moment it exists and is always reaped.
"""

import base64
import binascii
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid

from imaging_elements.sdk import hooklib
from imaging_elements.engine import config, confine, sandbox
from imaging_elements.convert import bootdisk, qemuimg
from imaging_elements.mount import disk
from imaging_elements.engine import hooks as hooks_mod
from imaging_elements.guest.guest import Guest, GuestPathError
from imaging_elements.sdk.journal import Journal
from imaging_elements.engine.monitor import clean as clean_text
from imaging_elements.engine.resources import ELEMENTS, LIB, SDK

AGENT = os.path.join("agent", "img-agent")  # in the element's directory
STOCK_ELEMENT = "instance-validate-linux"
SCOPE = "instance-validate"

GUEST_DIR = "/etc/img-instance-validate"
UNIT = "img-instance-validate.service"
SYSTEMD = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # the GPT type of an EFI system partition
MOUNTABLE = {"ext2": "ext2", "ext3": "ext3", "ext4": "ext4", "xfs": "xfs", "btrfs": "btrfs"}
TOOLS = (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
         ("qemu-storage-daemon", "qemu-system-common"), ("losetup", "mount"))
KVM_PROBE_CACHE = "/run/imaging-elements/kvm-probe.json"
KVM_PROBE_TIMEOUT = 6          # seconds for a kernel to print its banner under KVM
POWEROFF_TIMEOUT = 30          # seconds from the last result to qemu's exit
QEMU_OVERHEAD = 4 << 30        # address space beyond guest RAM (TCG's code buffer, firmware, threads)
# Bounds on what a guest can make the host keep (it controls every byte it sends).
OUTPUT_LIMIT = 16384           # bytes of a hook's output kept (the tail), in the guest and here
STATUS_LIMIT = 65536           # bytes of a hook's status lines sent, in the guest
LINE_LIMIT = 256 << 10         # bytes of one line of the results port; a longer line is dropped
RESULTS_LIMIT = 4 << 20        # bytes of the results port: more stops the guest
CONSOLE_LIMIT = 64 << 20       # bytes of the console log (IMG_INSTANCE_CONSOLE_LIMIT): more stops the guest
OVERLAY_LIMIT = 2 << 30        # bytes the guest may write to its disk (IMG_INSTANCE_OVERLAY_LIMIT)
MAX_TEXT = 2000                # characters of one describe/warn/fail text
MAX_WARN = 20                  # warnings kept per hook
KERNEL_LIMIT = 512 << 20       # a kernel or initrd read from the image, at most

# The IMG_* variables that name host things, or are secrets: never sent into the guest.
HOST_ONLY = sandbox.HOST_PATHS | {"IMG_STATUS_FD"}  # the guest's status fd is its own (3)

# Console lines that mean the guest will never reach the agent.
FATAL = [
    (re.compile(r"Kernel panic - not syncing: ?(.*)"), "the guest kernel panicked: {0}"),
    (re.compile(r"(You are in emergency mode|Entering emergency mode)"),
     "the guest dropped to systemd's emergency mode"),
    (re.compile(r"Give root password for maintenance"), "the guest dropped to a maintenance shell"),
    (re.compile(r"ALERT! +(.*) does not exist\. +Dropping to a shell!"),
     "the initramfs did not find the root filesystem {0}"),
    (re.compile(r"Dropping to a shell!|dracut Warning: .*emergency shell"),
     "the initramfs dropped to a shell"),
]
BIOS_FATAL = [  # SeaBIOS, on its debug port
    (re.compile(r"Boot failed: (.*)"), "the BIOS could not boot the disk: {0} (no boot loader?)"),
    (re.compile(r"No bootable device"), "the BIOS found no bootable device"),
]


class InstanceError(Exception):
    """The instance did not boot, hung, or crashed; the message names the console log."""


def run_phase(hooks, env, journal, emit):
    """Boot env['IMG_IMAGE'] and run `hooks` [(name, path), ...] inside, in order.

    Returns one dict per hook: {"hook", "ok", "description", "output",
    "skipped", "warnings", "duration"}.  Raises InstanceError when the guest
    cannot boot, hangs or crashes.
    """
    if not hooks:
        return []
    return _Instance(hooks, env, journal, emit).run()


# -- settings --------------------------------------------------------------------

def _number(env, name, default, kind=int):
    value = env.get(name) or default
    try:
        number = kind(value)
    except ValueError:
        raise InstanceError(f"{name}={value!r}: not a number") from None
    if number <= 0:
        raise InstanceError(f"{name}={value!r}: must be more than 0")
    return number


def _size(env, name, default):
    value = env.get(name) or default
    try:
        size = config.parse_size(value)
    except ValueError as exc:
        raise InstanceError(f"{name}: {exc}") from None
    if size < 1 << 20:
        raise InstanceError(f"{name}={value!r}: must be at least 1M")
    return size


def guest_environment(env):
    """The IMG_* variables the hooks see inside the guest: no host paths, no secrets."""
    inside = {name: value for name, value in env.items()
              if name.startswith("IMG_") and name not in HOST_ONLY and not config.is_secret_name(name)
              and "\n" not in value}
    inside.update(IMG_PHASE="instance-validate.d", IMG_INSTANCE="1", IMG_LIB=f"{GUEST_DIR}/lib",
                  IMG_STATUS_FD="3", IMG_HOST_HOSTNAME=socket.gethostname(),
                  IMG_INSTANCE_KEY=f"{GUEST_DIR}/instance-key",
                  LANG="C.UTF-8", HOME="/root", PYTHONPATH=f"{GUEST_DIR}/lib",
                  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return inside


# -- acceleration ----------------------------------------------------------------

def qemu_version():
    result = subprocess.run(["qemu-system-x86_64", "--version"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        raise InstanceError(f"qemu-system-x86_64 does not run: {result.stderr.strip()}")
    return result.stdout.splitlines()[0].strip()


def _host_kernel():
    """A kernel of the host's to probe KVM with, if there is one."""
    try:
        return bootdisk.find_kernel("/")[0]
    except OSError:
        return None


def _probe_key():
    return f"{os.uname().release} {qemu_version()}"


def cached_probe(key=None):
    """The cached KVM probe {"kvm": bool, "why": text} for this host, or None."""
    try:
        with open(KVM_PROBE_CACHE) as f:
            cached = json.load(f)
        if cached.get("key") == (key or _probe_key()) and isinstance(cached.get("kvm"), bool):
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    return None


def choose_accel(env, kernel, journal, workdir):
    """("kvm" or "tcg", why).  KVM only if it boots a real kernel here.

    /dev/kvm may exist and still not run a stock kernel (e.g. a paravirtual
    KVM in a nested sandbox): the probe boots `kernel` with no root under KVM
    and wants the kernel's banner within KVM_PROBE_TIMEOUT seconds.  The
    answer is cached in /run (per host kernel and qemu version)."""
    wanted = (env.get("IMG_INSTANCE_ACCEL") or "auto").lower()
    if wanted in ("kvm", "tcg"):
        return wanted, "IMG_INSTANCE_ACCEL"
    if wanted != "auto":
        raise InstanceError(f"IMG_INSTANCE_ACCEL={wanted!r}: use auto, kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    key = _probe_key()
    cached = cached_probe(key)
    if cached:
        return ("kvm" if cached["kvm"] else "tcg"), cached["why"] + " (cached)"
    kernel = kernel or _host_kernel()
    if not kernel:
        return "tcg", "no kernel to probe KVM with"
    works, why = _probe_kvm(kernel, journal, workdir)
    try:
        os.makedirs(os.path.dirname(KVM_PROBE_CACHE), exist_ok=True)
        temp = f"{KVM_PROBE_CACHE}.{os.getpid()}"
        with open(temp, "w") as f:
            json.dump({"key": key, "kvm": works, "why": why}, f)
        os.replace(temp, KVM_PROBE_CACHE)
    except OSError:
        pass
    return ("kvm" if works else "tcg"), why


def _probe_kvm(kernel, journal, workdir):
    log = os.path.join(workdir, "kvm-probe.log")
    entry = journal.add("remove", path=log, scope=SCOPE)
    open(log, "wb").close()
    files = [confine.File(kernel, "kernel"), confine.File(log, "console", write=True)]
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "256", "-no-reboot",
            "-kernel", files[0].inside,
            "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 root=/dev/null",
            "-chardev", f"file,id=console,path={files[1].inside}", "-serial", "chardev:console"]
    started = time.monotonic()
    process = confine.popen(argv, files, devices=["/dev/kvm"], limits=confine.Limits(memory=QEMU_OVERHEAD),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    kill = journal.add("kill", pid=process.pid, scope=SCOPE)
    banner = False
    try:
        while time.monotonic() - started < KVM_PROBE_TIMEOUT and process.poll() is None:
            time.sleep(0.1)
            with open(log, "rb") as f:
                if b"Linux version" in f.read(1 << 16):
                    banner = True
                    break
    finally:
        journal.undo(kill)
        process.wait()
        stderr = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        journal.undo(entry)
    if banner:
        return True, f"KVM boots a kernel here ({time.monotonic() - started:.1f} s to its banner)"
    if stderr and process.returncode not in (None, 0, -15, -9):
        return False, f"qemu cannot use KVM: {stderr.splitlines()[-1]}"
    return False, f"/dev/kvm is there, but a kernel printed nothing under KVM in {KVM_PROBE_TIMEOUT} s"


# -- the agent that runs inside the guest ------------------------------------------

UNIT_TEXT = """\
# Injected by euca-image-process into a throw-away overlay of this image.
[Unit]
Description=Instance validation by euca-image-process
After=multi-user.target

[Service]
Type=simple
ExecStart=/bin/sh /etc/img-instance-validate/img-agent
"""


def _remove_any(host):
    if os.path.isdir(host) and not os.path.islink(host):
        shutil.rmtree(host)
    elif os.path.lexists(host):
        os.unlink(host)


def _copy_label(host):
    """Give a new file its directory's SELinux label, so an enforcing guest may use it."""
    try:
        os.setxattr(host, "security.selinux", os.getxattr(os.path.dirname(host), "security.selinux"),
                    follow_symlinks=False)
    except OSError:
        pass


def _place(guest, path):
    """The host path for a new guest file `path`: the parents resolved inside the
    image, whatever was there removed, so nothing is ever written through a symlink."""
    host = guest.resolve(path, follow=False, must_exist=False)
    _remove_any(host)
    return host


def _write(host, data, mode=0o644):
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
    _copy_label(host)


def _ensure_dir(guest, path, mode=0o755):
    """A directory of the guest, created (with its parents) if missing."""
    parts = [p for p in path.split("/") if p]
    for depth in range(1, len(parts) + 1):
        sub = "/" + "/".join(parts[:depth])
        host = guest.resolve(sub, must_exist=False)
        if os.path.isdir(host):
            continue
        _remove_any(host)
        os.mkdir(host, mode)
        _copy_label(host)
    return guest.resolve(path)


def _ssh_keypair():
    """A fresh ed25519 key pair in OpenSSH formats: (private, public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b" euca-image-process-instance-validation\n"


def agent_file(hooks):
    """The in-guest agent (agent/img-agent): from the element of the hooks, else the stock one's."""
    dirs = [os.path.dirname(os.path.dirname(path)) for _, path in hooks]
    for element_dir in dirs + [os.path.join(ELEMENTS, STOCK_ELEMENT)]:
        path = os.path.join(element_dir, AGENT)
        if os.path.isfile(path):
            return path
    raise InstanceError(f"no in-guest agent: neither the elements of the hooks nor {STOCK_ELEMENT} "
                        f"has {AGENT}")


def _exports(settings):
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(settings.items())).encode()


def inject(root, hooks, env, token, settle, hook_timeout):
    """Put the agent, the hooks and an SSH key into the guest mounted (writable) at `root`."""
    guest = Guest(root)
    agent_path = agent_file(hooks)
    agent = _place(guest, GUEST_DIR)
    os.mkdir(agent, 0o700)
    for sub in ("hooks", "lib", "lib/imaging_elements", "lib/imaging_elements/sdk", "secrets"):
        os.mkdir(os.path.join(agent, sub), 0o700 if sub == "secrets" else 0o755)
    parsed = [hooks_mod.Hook("instance-validate", name, path, os.path.basename(os.path.dirname(
        os.path.dirname(path)))) for name, path in hooks]
    for hook in parsed:
        with open(hook.path, "rb") as f:
            _write(os.path.join(agent, "hooks", hook.name), f.read(), 0o755)
        # A secret reaches the guest only for a hook that declares it (#@ needs-secret:).
        secrets = {name: env[name] for name in sorted(hook.secrets) if name in env}
        if secrets:
            _write(os.path.join(agent, "secrets", hook.name), _exports(secrets), 0o600)
    _write(os.path.join(agent, "hooks.list"),
           "".join(f"{hook.name} {int('accepts' in hook.verbs)}\n" for hook in parsed).encode())
    with open(os.path.join(LIB, "img-functions"), "rb") as f:
        _write(os.path.join(agent, "lib", "img-functions"), f.read())
    # The hook SDK as a package (`from imaging_elements.sdk import hooklib`, as on the host and
    # in the sandbox), not the whole toolkit; imaging_elements/ a regular package, so that first
    # on PYTHONPATH it wins over any copy the image holds.
    _write(os.path.join(agent, "lib", "imaging_elements", "__init__.py"), b"")
    for name in sorted(os.listdir(SDK)):
        if name.endswith(".py"):
            with open(os.path.join(SDK, name), "rb") as f:
                _write(os.path.join(agent, "lib", "imaging_elements", "sdk", name), f.read())
    settings = guest_environment(env)
    settings.update(IMGV_TOKEN=token, IMGV_PORT="/dev/ttyS1", IMGV_SETTLE=str(settle),
                    IMGV_HOOK_TIMEOUT=str(hook_timeout), IMGV_OUTPUT_LIMIT=str(OUTPUT_LIMIT),
                    IMGV_STATUS_LIMIT=str(STATUS_LIMIT))
    _write(os.path.join(agent, "env.sh"), _exports(settings))
    with open(agent_path, "rb") as f:
        _write(os.path.join(agent, "img-agent"), f.read(), 0o755)

    # The unit, wanted by multi-user.target.
    _ensure_dir(guest, "/etc/systemd/system/multi-user.target.wants")
    _write(_place(guest, f"/etc/systemd/system/{UNIT}"), UNIT_TEXT.encode())
    os.symlink(f"/etc/systemd/system/{UNIT}",
               _place(guest, f"/etc/systemd/system/multi-user.target.wants/{UNIT}"))

    # Key injection, as a cloud does it at launch: root's authorized_keys.
    private, public = _ssh_keypair()
    _write(os.path.join(agent, "instance-key"), private, 0o600)
    _ensure_dir(guest, "/root/.ssh", 0o700)
    keys_path = "/root/.ssh/authorized_keys"
    try:
        old = guest.read_bytes(keys_path)
    except GuestPathError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    _write(_place(guest, keys_path), old + public, 0o600)


# -- the results protocol ----------------------------------------------------------

def clean(text, limit=MAX_TEXT):
    """One line of guest text, safe for a terminal, a log line or an event, at most `limit` characters."""
    return clean_text(text[:limit])[:limit]


def clean_output(text):
    """A hook's output from the guest: its last OUTPUT_LIMIT characters, lines kept, each cleaned."""
    return "\n".join(clean_text(line) for line in text[-OUTPUT_LIMIT:].replace("\r\n", "\n").split("\n"))


def _b64(text):
    """A payload of a line (at most LINE_LIMIT bytes, so this is bounded too)."""
    if text in ("", "-"):
        return ""
    try:
        return base64.b64decode(text, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        return "(undecodable)"


def parse_status(text):
    """{describe: [...], warn: [...], fail: str or None, refused: [...]} from a hook's status lines.

    A guest may say describe, progress, warn and fail; anything else (set above
    all: the guest never steers the host) is refused, and said so."""
    said = {"describe": [], "warn": [], "fail": None, "refused": []}
    for line in text.splitlines():
        try:
            message = json.loads(line)
            (kind, value), = message.items()
        except (ValueError, AttributeError, RecursionError):
            kind, value = None, None
        if kind in ("describe", "warn", "fail") and isinstance(value, (str, int, float)):
            value = clean(str(value))
            if kind == "fail":
                said["fail"] = value
            elif len(said[kind]) < MAX_WARN:
                said[kind].append(value)
        elif kind == "progress":
            continue  # nobody watches a guest's progress live: its results come at the end
        elif len(said["refused"]) < MAX_WARN:
            said["refused"].append(clean(line, 200))
    return said


class Results:
    """Reads the agent's lines `IMGV TOKEN KIND ...` from the results port.

    Every byte comes from the guest: lines are cut at LINE_LIMIT, texts cleaned
    and bounded, and only lines with this boot's token, for the hooks sent,
    once each, count."""

    def __init__(self, token, names, hook_timeout=None):
        self.token = token
        self.hook_timeout = hook_timeout
        self.names = list(names)
        self.buffer = b""
        self.dropping = False        # inside a line longer than LINE_LIMIT
        self.dropped = 0             # lines dropped as too long
        self.begun = self.done = False
        self.state = None
        self.current = None          # the hook running now, and since when
        self.started_at = None
        self.results = {}

    def feed(self, data, now):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if self.dropping:  # the end of an over-long line
                self.dropping = False
                continue
            if len(line) <= LINE_LIMIT:
                self._line(line.decode(errors="replace").strip("\r\0"), now)
            else:
                self.dropped += 1
        if len(self.buffer) > LINE_LIMIT:  # a line with no end in sight: forget it
            self.dropped += not self.dropping
            self.buffer, self.dropping = b"", True

    def _line(self, line, now):
        words = line.split(" ")
        if len(words) < 3 or words[0] != "IMGV" or words[1] != self.token:
            return
        kind, args = words[2], words[3:] + ["", "", ""]  # empty payloads may be cut off
        if kind == "BEGIN":
            self.begun = True
        elif kind == "STATE" and args:
            self.state = clean(args[0], 32)
        elif kind == "START" and args and args[0] in self.names:
            self.current, self.started_at = args[0], now
        elif kind == "SKIP" and args[0] in self.names:
            reason = clean(_b64(args[2]).strip()) or "declined"
            if args[1] != "1":
                reason = f"accepts failed (exit {clean(args[1], 10)}): {reason}"
            self._store(args[0], {"ok": True, "skipped": True, "description": f"not applicable: {reason}",
                                  "output": "", "warnings": []}, now)
        elif kind == "RESULT" and args[0] in self.names and args[1].isdigit() and len(args[1]) < 4:
            name, code = args[0], args[1]
            said, output = parse_status(_b64(args[2])), clean_output(_b64(args[3]))
            ok = code == "0"
            if ok:
                description = "; ".join(said["describe"])
            elif code in ("124", "137"):
                description = said["fail"] or (f"did not finish within IMG_INSTANCE_HOOK_TIMEOUT="
                                               f"{self.hook_timeout or '?'} s (stopped)")
            else:
                last = [line for line in output.splitlines() if line.strip()][-1:]
                description = said["fail"] or f"exit {code}" + (f": {clean(last[0])}" if last else "")
            if code == "127" and not said["fail"]:
                description = f"exit 127: the guest cannot run the hook ({clean(output.strip()[-200:])})"
            warnings = [f"status line refused (a guest may send describe, progress, warn and fail "
                        f"only): {line}" for line in said["refused"]] + said["warn"]
            self._store(name, {"ok": ok, "skipped": False, "description": clean(description, 2 * MAX_TEXT),
                               "output": output, "warnings": warnings[:MAX_WARN]}, now,
                        guest_seconds=int(args[4]) / 100 if args[4].isdigit() and len(args[4]) < 9 else None)
        elif kind == "DONE":
            self.done = True

    def _store(self, name, result, now, guest_seconds=None):
        if name in self.results:
            return
        began = self.started_at if self.current == name and self.started_at else now
        duration = guest_seconds if guest_seconds is not None else now - began
        result.update(hook=name, duration=round(duration, 3))
        self.results[name] = result
        self.current = None

    def ordered(self):
        missing = {"ok": False, "skipped": False, "output": "", "warnings": [], "duration": 0,
                   "description": "no result from the guest"}
        return [self.results.get(name) or dict(missing, hook=name) for name in self.names]


def _fatal(patterns, text):
    for pattern, message in patterns:
        match = pattern.search(text)
        if match:
            groups = [g.strip() for g in match.groups() if g] or [""]
            return message.format(*groups).rstrip(": ")
    return None


def _tail(path, lines=15):
    try:
        with open(path, "rb") as f:
            f.seek(max(os.fstat(f.fileno()).st_size - 8192, 0))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    # The console is the guest's: colour codes dropped, every other control escaped.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
    kept = [clean(line.rstrip(), 500) for line in text.split("\n") if line.strip()][-lines:]
    return "\n".join(kept)


# -- one boot -------------------------------------------------------------------------

class _Instance:
    def __init__(self, hooks, env, journal, emit):
        self.hooks = [(name, path) for name, path in hooks]
        self.env = env
        self.journal = journal
        self.emit = emit
        self.ids = []  # our journal entries, undone newest first at the end
        self.image = env.get("IMG_IMAGE") or ""
        self.type = env.get("IMG_IMAGE_TYPE") or "raw"
        self.timeout = _number(env, "IMG_INSTANCE_TIMEOUT", 300, float)
        self.hook_timeout = _number(env, "IMG_INSTANCE_HOOK_TIMEOUT", 120)
        self.settle = _number(env, "IMG_INSTANCE_SETTLE", 90)
        self.memory = _number(env, "IMG_INSTANCE_MEMORY", 1024)
        self.cpus = _number(env, "IMG_INSTANCE_CPUS", min(2, os.cpu_count() or 1))
        self.bus = env.get("IMG_INSTANCE_DISK_BUS") or "virtio"
        if self.bus not in ("virtio", "ide", "sata", "scsi"):
            raise InstanceError(f"IMG_INSTANCE_DISK_BUS={self.bus!r}: use virtio, ide, sata or scsi")
        self.nic = env.get("IMG_INSTANCE_NIC") or "virtio-net-pci"
        if self.nic not in ("virtio-net-pci", "e1000", "rtl8139"):
            raise InstanceError(f"IMG_INSTANCE_NIC={self.nic!r}: use virtio-net-pci, e1000 or rtl8139")
        self.console_limit = _size(env, "IMG_INSTANCE_CONSOLE_LIMIT", CONSOLE_LIMIT)
        self.overlay_limit = _size(env, "IMG_INSTANCE_OVERLAY_LIMIT", OVERLAY_LIMIT)
        self.token = uuid.uuid4().hex[:16]

    # -- journal -------------------------------------------------------------------
    def _add(self, action, **args):
        entry = self.journal.add(action, scope=SCOPE, **args)
        self.ids.append(entry)
        return entry

    def _undo(self, entry):
        if entry in self.ids:
            self.ids.remove(entry)
            self.journal.undo(entry)

    def _undo_since(self, entry):
        """Undo `entry` and everything recorded after it, newest first."""
        while entry in self.ids:
            self._undo(self.ids[-1])

    def _release(self):
        for entry in reversed(self.ids):
            try:
                self.journal.undo(entry)
            except KeyError:
                pass
            except Exception as exc:  # one failure must not stop the others
                self.emit({"warn": f"instance cleanup failed: {exc}"})
        self.ids = []

    # -- the whole story -----------------------------------------------------------
    def run(self):
        try:
            self._check_image()
            self._prepare_dirs()
            self._overlay()
            boot = self._inject()
            if boot is None:
                return self._not_applicable()
            accel, why = choose_accel(self.env, boot.pop("probe_kernel", None), self.journal, self.dir)
            return self._boot(accel, why, boot)
        finally:
            self._release()

    def _check_image(self):
        for tool, package in TOOLS:
            if not shutil.which(tool, path=self.env.get("PATH") or os.environ.get("PATH")):
                raise InstanceError(f"booting the image needs {tool} (Debian package {package}), not found on PATH")
        if self.env.get("IMG_PLATFORM") == "windows":
            raise InstanceError(f"{self.image}: instance validation of Windows guests is not "
                                "implemented (see docs/instance-validators.md for the design)")
        if not os.path.isfile(self.image):
            raise InstanceError(f"{self.image or 'IMG_IMAGE'}: no image to boot (not a file)")
        self.fmt = qemuimg.DRIVERS.get(self.type)
        if self.fmt is None:
            raise InstanceError(f"{self.image}: cannot boot a {self.type} image "
                                f"(types: {', '.join(sorted(qemuimg.DRIVERS))})")
        try:
            if self.fmt == "raw":
                self.size = os.path.getsize(self.image)
            else:
                self.size = int(disk.check_container(self.image, self.type)["virtual-size"])
                disk.qemu_check(self.image, self.type)
        except (disk.DiskError, qemuimg.QemuImgError) as exc:
            raise InstanceError(str(exc)) from None

    def _prepare_dirs(self):
        work = self.env.get("IMG_WORK_DIR") or ""
        if not os.path.isdir(work):
            raise InstanceError(f"IMG_WORK_DIR={work!r}: not a directory")
        scratch = self.env.get("IMG_SCRATCH_DIR") or work
        self.dir = os.path.join(scratch, f"instance-{self.token[:8]}")
        self._add("remove", path=self.dir)
        os.mkdir(self.dir, 0o700)
        logs = os.path.join(work, "logs")
        logs = logs if os.path.isdir(logs) else work
        # Kept after the process (not in the journal): the evidence of a failed boot.
        self.console = os.path.join(logs, "instance-console.log")
        self.bios_log = os.path.join(logs, "instance-bios.log")
        for path in (self.console, self.bios_log):
            _remove_any(path)

    def _overlay(self):
        self.overlay = os.path.join(self.dir, "overlay.qcow2")
        # No backing file named in the overlay: the image is attached by qemu
        # options (read-only), so nothing ever opens a path read from a file.
        result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.overlay, str(self.size)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode:
            raise InstanceError(f"{self.overlay}: qemu-img create failed: {result.stderr.strip()}")

    def _blockdevs(self, image=None, overlay=None):
        """The base image (read-only) under the overlay; the paths default to the host's."""
        base = {"driver": self.fmt, "node-name": "base", "read-only": True,
                "file": {"driver": "file", "filename": image or os.path.abspath(self.image),
                         "read-only": True}}
        if self.fmt in ("qcow2", "vmdk"):
            base["backing"] = None
        top = {"driver": "qcow2", "node-name": "disk", "backing": "base",
               "file": {"driver": "file", "filename": overlay or self.overlay}}
        return [base, top]

    # -- injection -------------------------------------------------------------------
    def _inject(self):
        """Write the agent into the overlay; returns the boot settings, or None for a
        guest the agent cannot start in (no systemd)."""
        export = os.path.join(self.dir, "overlay.raw")
        files = [confine.File(os.path.abspath(self.image), "image"),
                 confine.File(self.overlay, "overlay", write=True)]
        nodes = self._blockdevs(files[0].inside, files[1].inside)
        entries = []

        def record(action, **args):
            entries.append(self._add(action, **args))
            return entries[-1]
        try:
            daemon = disk.fuse_export(nodes, files, export, True, self.image, self.type, record)
        except disk.DiskError as exc:
            if entries:
                self._undo_since(entries[0])
            raise InstanceError(str(exc)) from None
        try:
            if self.type != "partition":
                self._check_boot_code(export)
            found = self._mount_root(export)
            boot = self._prepare_boot(found)
        finally:
            self._undo_since(entries[0])  # mounts, loop devices, then the daemon and its export
            daemon.wait()
        return boot

    def _check_boot_code(self, export):
        """A whole disk boots through the code in its MBR: none there, no boot (and no wait)."""
        with open(export, "rb") as f:
            mbr = f.read(512)
        if len(mbr) == 512 and mbr[:440].count(0) != 440:
            return
        try:
            uefi = len(mbr) == 512 and mbr[450] == 0xEE and any(
                p["type"] == ESP for p in disk.partition_table(export, self.image))
        except disk.DiskError:
            uefi = False
        raise InstanceError(f"{self.image}: the disk cannot boot: its MBR holds no boot code "
                            + ("(a UEFI-only disk: booting with UEFI firmware is not supported yet)"
                               if uefi else "(no BIOS boot loader installed)"))

    def _mount_root(self, export):
        """(mount point, [journal ids]) of the guest's Linux root in the overlay."""
        if self.type == "partition":
            entries = [{"index": 0, "start": 0, "size": self.size}]
        else:
            try:
                entries = disk.partition_table(export, self.image)
            except disk.DiskError as exc:
                raise InstanceError(str(exc)) from None
        target = os.path.join(self.dir, "root")
        os.mkdir(target)
        tried = []
        for entry in entries:
            fstype = disk.probe(export, entry["start"], entry["size"])["fstype"]
            where = f"partition {entry['index']}" if entry["index"] else "the filesystem"
            if fstype not in MOUNTABLE:
                tried.append(f"{where}: {fstype or 'no filesystem'}")
                continue
            ids = self._mount(export, entry, fstype, target)
            kind = disk.classify_root(target)
            subvol = disk.btrfs_root_subvolume(target) if kind is None and fstype == "btrfs" else None
            if subvol:  # the root is a subvolume (e.g. @): mount that instead
                self._undo_since(ids[0])
                ids = self._mount(export, entry, fstype, target, [f"subvol={subvol}"])
                kind = disk.classify_root(target)
            if kind == "linux":
                return target, ids
            tried.append(f"{where}: {fstype}, not a Linux root")
            for entry_id in reversed(ids):
                self._undo(entry_id)
        raise InstanceError(f"{self.image}: no Linux root filesystem to start the validators from "
                            f"({'; '.join(tried) or 'no partitions'})")

    def _mount(self, export, entry, fstype, target, extra=()):
        try:
            device, loop = hooklib.losetup(export, entry["start"], entry["size"], readonly=False,
                                           journal_=Journal(self.journal.path, scope=SCOPE))
        except hooklib.HookFailure as exc:
            raise InstanceError(str(exc)) from exc
        self.ids.append(loop)
        mount = self._add("umount", path=os.path.realpath(target))
        options = ",".join(disk.mount_options(MOUNTABLE[fstype], True) + list(extra))
        result = subprocess.run(["mount", "-t", MOUNTABLE[fstype], "-o", options, device, target],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode:
            self._undo(mount)
            self._undo(loop)
            raise InstanceError(f"{self.image}: cannot mount its {fstype} filesystem in the overlay: "
                                f"{result.stderr.strip()}")
        return [loop, mount]

    def _prepare_boot(self, found):
        root, ids = found
        guest = Guest(root)
        boot = {}
        try:
            if not any(guest.exists(path) for path in SYSTEMD):
                self.emit({"warn": f"{self.image}: the guest has no systemd ({' or '.join(SYSTEMD)}): "
                                   "the instance validators cannot be started in it"})
                return None
            inject(root, self.hooks, self.env, self.token, self.settle, self.hook_timeout)
            kernel = ramdisk = None
            if self.type == "partition" or self._needs_probe():
                kernel, ramdisk = bootdisk.find_kernel(root)
            if self.type == "partition":
                boot["kernel"] = self.env.get("IMG_KERNEL") or self._copy_out(guest, kernel, "kernel")
                boot["initrd"] = self.env.get("IMG_RAMDISK") or (
                    self._copy_out(guest, ramdisk, "initrd") if ramdisk and not self.env.get("IMG_KERNEL") else None)
                boot["probe_kernel"] = boot["kernel"]
            elif kernel:
                boot["probe_kernel"] = self._copy_out(guest, kernel, "probe-kernel")
        except (GuestPathError, bootdisk.BootDiskError, hooks_mod.HookError, OSError) as exc:
            raise InstanceError(f"{self.image}: cannot prepare the guest for validation: {exc}") from None
        finally:
            for entry_id in reversed(ids):
                self._undo(entry_id)
        return boot

    def _needs_probe(self):
        wanted = (self.env.get("IMG_INSTANCE_ACCEL") or "auto").lower()
        return wanted == "auto" and os.access("/dev/kvm", os.R_OK | os.W_OK) and not cached_probe()

    def _copy_out(self, guest, guest_path, name):
        if not guest_path:
            raise InstanceError(f"{self.image}: a partition image boots with -kernel, but it has no "
                                "kernel in /boot (nor /vmlinuz) and IMG_KERNEL was not given")
        target = os.path.join(self.dir, name)
        with guest.open(guest_path) as src, open(target, "wb") as dst:
            if os.fstat(src.fileno()).st_size > KERNEL_LIMIT:
                raise InstanceError(f"{self.image}: {guest_path} is over {KERNEL_LIMIT} bytes")
            shutil.copyfileobj(src, dst, 1 << 20)
        return target

    def _not_applicable(self):
        return [{"hook": name, "ok": True, "skipped": True, "output": "", "warnings": [], "duration": 0,
                 "description": "not applicable: the guest has no systemd to start the validators"}
                for name, _ in self.hooks]

    # -- the boot ---------------------------------------------------------------------
    def cpu_model(self, accel):
        if self.env.get("IMG_INSTANCE_CPU_MODEL"):
            return self.env["IMG_INSTANCE_CPU_MODEL"]
        # TCG: "max" (all it emulates) boots Debian faster than qemu64; turning
        # off vmx/svm in it made udev fail in the guest.
        return "host" if accel == "kvm" else "max"

    def qemu_argv(self, accel, boot, results, paths=None):
        """qemu-system's argv; `paths` names the files as the sandbox shows them
        (image, overlay, console, results, bios, kernel, initrd), else the host's."""
        paths = paths or {"image": os.path.abspath(self.image), "overlay": self.overlay,
                          "console": self.console, "results": results, "bios": self.bios_log,
                          "kernel": boot.get("kernel"), "initrd": boot.get("initrd")}
        argv = ["qemu-system-x86_64", "-name", "euca-image-process-instance",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "pc", "-accel", accel, "-cpu", self.cpu_model(accel),
                "-m", str(self.memory), "-smp", str(self.cpus),
                "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        for node in self._blockdevs(paths["image"], paths["overlay"]):
            argv += ["-blockdev", json.dumps(node)]
        # Fixed PCI slots: the NIC is in slot 3, as on a default qemu machine
        # (so a guest configured for ens3 finds it); the disk is in slot 4.
        if self.bus == "virtio":
            argv += ["-device", "virtio-blk-pci,drive=disk,addr=0x4"]
        elif self.bus == "ide":
            argv += ["-device", "ide-hd,drive=disk,bus=ide.0"]
        elif self.bus == "sata":
            argv += ["-device", "ahci,id=ahci,addr=0x4", "-device", "ide-hd,drive=disk,bus=ahci.0"]
        else:
            argv += ["-device", "virtio-scsi-pci,id=scsi,addr=0x4",
                     "-device", "scsi-hd,drive=disk,bus=scsi.0"]
        argv += ["-netdev", "user,id=net0,restrict=on",
                 "-device", f"{self.nic},netdev=net0,addr=0x3,mac=52:54:00:12:34:56",
                 "-chardev", f"file,id=console,path={paths['console']}", "-serial", "chardev:console",
                 "-chardev", f"file,id=results,path={paths['results']}", "-serial", "chardev:results",
                 "-chardev", f"file,id=bios,path={paths['bios']}",
                 "-device", "isa-debugcon,iobase=0x402,chardev=bios"]
        if boot.get("kernel"):
            root = {"virtio": "/dev/vda", "scsi": "/dev/sda"}.get(self.bus, "/dev/sda")
            cmdline = f"root={root} ro console=ttyS0,115200 panic=-1 quiet"
            extra = self.env.get("IMG_KERNEL_CMDLINE")
            argv += ["-kernel", paths["kernel"], "-append", f"{cmdline} {extra}" if extra else cmdline]
            if boot.get("initrd"):
                argv += ["-initrd", paths["initrd"]]
        return argv

    def _boot(self, accel, why, boot):
        results_path = os.path.join(self.dir, "results")
        qemu_log = os.path.join(self.dir, "qemu.log")
        for path in (results_path, self.console, self.bios_log):
            open(path, "wb").close()
        how = "with -kernel from " + ("IMG_KERNEL" if self.env.get("IMG_KERNEL") else "the image") \
            if boot.get("kernel") else "through its own boot loader"
        self.emit({"describe": f"booting {self.image} {how} under qemu ({accel}: {why})"})
        # qemu runs confined to its files: the image (read-only), the overlay, the
        # kernel and initrd it boots, its logs, and /dev/kvm for KVM.
        hosts = {"image": os.path.abspath(self.image), "overlay": self.overlay, "console": self.console,
                 "results": results_path, "bios": self.bios_log, "kernel": boot.get("kernel"),
                 "initrd": boot.get("initrd")}
        files = [confine.File(path, name, write=name in ("overlay", "console", "results", "bios"))
                 for name, path in hosts.items() if path]
        argv = self.qemu_argv(accel, boot, results_path, {f.name: f.inside for f in files})
        # A hard bound on every file qemu writes (overlay, logs), beyond the limits
        # _follow checks 10 times a second: SIGXFSZ ends qemu there.
        limits = confine.Limits(memory=(self.memory << 20) + QEMU_OVERHEAD, file_size=self._file_bound())
        started = time.monotonic()
        with open(qemu_log, "wb") as out:
            process = confine.popen(argv, files, devices=["/dev/kvm"] if accel == "kvm" else [],
                                    limits=limits, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        entry = self._add("kill", pid=process.pid)
        results = Results(self.token, [name for name, _ in self.hooks], self.hook_timeout)
        try:
            reason, up_at = self._follow(process, results, results_path, started)
            if not results.done:
                # Say why from what we saw, then stop qemu (its exit code changes then).
                message = self._failure(reason, process.poll(), results, started, qemu_log)
                self._undo(entry)
                raise InstanceError(message)
            done_at = time.monotonic()
            try:
                process.wait(timeout=POWEROFF_TIMEOUT)
                self.emit({"describe": f"the guest ran {len(results.results)} validator(s) in "
                                       f"{done_at - (up_at or started):.1f} s and powered off in "
                                       f"{time.monotonic() - done_at:.1f} s ({time.monotonic() - started:.1f} s "
                                       "from boot to power-off)"})
            except subprocess.TimeoutExpired:
                self.emit({"warn": f"the guest did not power off within {POWEROFF_TIMEOUT} s after "
                                   "the validators; stopped it"})
        finally:
            self._undo(entry)  # SIGTERM, then SIGKILL; a no-op once qemu is gone
            process.wait()
        if results.state and results.state not in ("running", "degraded"):
            self.emit({"warn": f"the guest's boot had not settled after {self.settle} s "
                               f"(systemctl is-system-running: {results.state})"})
        if results.dropped:
            self.emit({"warn": f"the guest sent {results.dropped} line(s) of more than {LINE_LIMIT} bytes "
                               "on the results port; dropped"})
        ordered = results.ordered()
        for result in ordered:
            for text in result["warnings"]:
                self.emit({"warn": f"{result['hook']}: {text}"})
        return ordered

    def _file_bound(self):
        return max(self.overlay_limit + (self.overlay_limit >> 3), self.console_limit) + (64 << 20)

    def _over_bound(self, results_size, console_size):
        """Why the guest must be stopped for what it wrote, or None."""
        if results_size > RESULTS_LIMIT:
            return (f"the guest sent more than {RESULTS_LIMIT} bytes on the results port (ttyS1); "
                    "stopped it")
        if console_size > self.console_limit:
            return (f"the guest wrote more than IMG_INSTANCE_CONSOLE_LIMIT={self.console_limit} bytes "
                    "to its console (or the BIOS debug port); stopped it")
        try:
            written = os.stat(self.overlay).st_blocks * 512
        except OSError:
            written = 0
        if written > self.overlay_limit:
            return (f"the guest wrote more than IMG_INSTANCE_OVERLAY_LIMIT={self.overlay_limit} bytes "
                    "to its disk (the throw-away overlay); stopped it")
        return None

    def _follow(self, process, results, results_path, started):
        """Read the results port, the console and the BIOS log until the agent is
        done, the guest fails, qemu exits or the time is up; returns (fatal
        reason or None, when the agent began or None)."""
        up_at, console, bios = None, "", ""
        with open(results_path, "rb") as res, open(self.console, "rb") as con, \
                open(self.bios_log, "rb") as bio:
            while True:
                exited = process.poll() is not None  # before reading: nothing is lost
                now = time.monotonic()
                data = res.read(65536)
                # What the files hold, not what was read yet: a fast guest is ahead of us.
                reason = self._over_bound(os.fstat(res.fileno()).st_size,
                                          max(os.fstat(con.fileno()).st_size, os.fstat(bio.fileno()).st_size))
                if reason:
                    return reason, up_at
                if data:
                    results.feed(data, now)
                if results.begun and up_at is None:
                    up_at = now
                    self.emit({"describe": f"the guest is up and runs the validators "
                                           f"{now - started:.1f} s after the start"})
                if results.done:
                    return None, up_at
                console = (console + con.read(65536).decode(errors="replace"))[-16384:]
                bios = (bios + bio.read(65536).decode(errors="replace"))[-4096:]
                reason = _fatal(FATAL, console) or _fatal(BIOS_FATAL, bios)
                if reason:
                    time.sleep(1)  # let the console say the rest
                    return reason, up_at
                if exited or now - started > self.timeout:
                    return None, up_at
                time.sleep(0.1)

    def _failure(self, reason, code, results, started, qemu_log):
        elapsed = time.monotonic() - started
        if reason:
            what = f"{reason} ({elapsed:.0f} s after the start)"
        elif code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
            what = (f"qemu was stopped at its file size bound ({self._file_bound()} bytes): the guest "
                    "wrote too much to its disk or a serial port")
        elif code is not None and code != 0:
            what = f"qemu failed (exit {code}): {_tail(qemu_log, 3) or 'no message'}"
        elif code == 0:
            what = (f"the guest stopped (powered off or rebooted) {elapsed:.0f} s after the start, "
                    + ("before the validators finished" if results.begun
                       else "before the validation agent started"))
        elif results.current:
            what = (f"no result within IMG_INSTANCE_TIMEOUT={self.timeout:g} s: the guest hung "
                    f"while running {results.current}")
        elif results.begun:
            what = f"the validators did not finish within IMG_INSTANCE_TIMEOUT={self.timeout:g} s"
        else:
            what = (f"the guest did not come up within IMG_INSTANCE_TIMEOUT={self.timeout:g} s "
                    "(the validation agent never started)")
        tail = _tail(self.console) or "(the console is empty: does the guest log to ttyS0?)"
        return f"{self.image}: {what}; console log: {self.console}; it ends:\n{tail}"
