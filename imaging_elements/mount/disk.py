"""Mount disk images on a host without device-mapper.

The pieces the mounter elements (elements/mount-*) are made of:

* `partition_table()`: a raw disk's partitions, from `sfdisk --json`, checked
  (inside the disk, no overlaps);
* `probe()`: the filesystem in a byte range, from `blkid -p --offset --size`
  (no loop device needed to look);
* `export_raw()`: a read-only raw view of a vmdk/qcow2/vhd/vhdx file, served
  as a FUSE file by qemu-storage-daemon: nothing is converted;
* `attach()` and `mount_fs()`: a loop device at the partition's offset (so
  neither kpartx nor `losetup -P` is needed), mounted by the kernel, by
  ntfs-3g (FUSE), or, for FAT, copied out with mtools and bound read-only;
* `mount_step()`: find the guest's root and mount the guest's own fstab
  entries beneath it, resolving UUID=, LABEL=, PARTUUID=, PARTLABEL= and
  /dev names against the image's partitions, never the host's devices
  (imaging_elements.mount.fstab, shared with the validators).

The mounter hooks share their state in `$IMG_WORK_DIR/filesystems.json`
(see docs/mounters.md).  Every loop device, mount and daemon is in the cleanup
journal before (or, for a daemon, the instant after) it exists.
"""

import contextlib
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib

from imaging_elements.engine import confine, tools
from imaging_elements.sdk import hooklib
from imaging_elements.convert import qemuimg
from imaging_elements.mount import fstab
from imaging_elements.guest.guest import Guest, GuestPathError, detect_platform

KERNEL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs")
# Filesystems the kernel here cannot mount, and the element that can.
FUSE_FS = {"ntfs": "mount-ntfs", "vfat": "mount-fat"}
QEMU_DRIVERS = {"vmdk": "vmdk", "qcow2": "qcow2", "vhd": "vpc", "vhdx": "vhdx"}
# dos partition types that only contain other partitions.
EXTENDED = {"5", "f", "85"}
INITS = ("/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")
READY_TIMEOUT = 30  # seconds for a FUSE daemon to show its mount
EXPORT_LIMITS = confine.Limits()  # qemu-storage-daemon: memory and processes bounded, no CPU bound


class DiskError(hooklib.HookFailure):
    """A problem with the image or the host; the message names the file and the reason."""


class DamagedDisk(DiskError, tools.BadInput):
    """The image is at fault (unreadable, truncated, corrupt, hostile): status bad-input, exit 3."""


class InjectedFault(DiskError):
    """Raised by fault(): never taken for a problem of one candidate filesystem."""


# -- small helpers -----------------------------------------------------------

def fault(step):
    """Test hook: IMG_MOUNT_FAULT=STEP fails here; STEP:kill dies by SIGKILL here."""
    name, _, how = os.environ.get("IMG_MOUNT_FAULT", "").partition(":")
    if name == step:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"fault injected after step {step!r} (IMG_MOUNT_FAULT)")


def display_name():
    """The image as the user knows it, for messages."""
    return os.environ.get("IMG_IMAGE") or os.environ.get("IMG_INPUT") or "the image"


def current_disk():
    """The file to mount: the raw view a container mounter made, else the image itself."""
    disk = os.environ.get("IMG_DISK") or os.environ.get("IMG_IMAGE")
    if not disk:
        raise DiskError("neither IMG_DISK nor IMG_IMAGE is set: nothing to mount")
    return disk


def writable():
    return os.environ.get("IMG_MOUNT_WRITABLE") == "1"


def _run(argv, what, **kwargs):
    """A system tool (engine/tools.py); its failure is a DiskError saying `what` we did."""
    try:
        return tools.run(argv, what, **kwargs)
    except tools.ToolError as exc:
        raise DiskError(str(exc)) from None


def dm_available():
    """Whether the kernel has device-mapper (kpartx and LVM need it).  Not
    /dev/mapper/control: lvm2's tools create that node even where the kernel
    has no driver behind it."""
    try:
        with open("/proc/misc") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


# -- partition tables and filesystems -----------------------------------------

def partition_table(path, name=None):
    """The partitions of the raw disk `path`, as dicts with byte offsets.

    Keys: index (the partition number: 1.., dos logical partitions from 5),
    start, size, type, partuuid, partlabel.  Extended (container) partitions
    are left out.  A partition past the end of the disk, overlapping another
    or covering the partition table itself is an error.
    """
    name = name or path
    try:
        result = tools.run(["sfdisk", "--json", path], ok=range(256))
    except tools.ToolError as exc:  # missing, hung or killed: the host's problem
        raise DiskError(str(exc).replace(path, name)) from None
    if result.code or not result.stdout.strip():
        reason = tools.tail(result.stderr).replace(path, name) or "sfdisk found no partition table"
        raise DamagedDisk(f"{name}: cannot read the partition table: {reason}")
    for line in result.stderr.strip().splitlines():
        hooklib.warn(f"{name}: {line.replace(path, name)}")
    table = json.loads(result.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    disk_size = os.path.getsize(path)
    label = table.get("label")
    disk_id = str(table.get("id", "")).lower()
    parts = []
    for raw in table.get("partitions", []):
        node = raw["node"]
        index = int(re.search(r"(\d+)$", node[len(table.get("device", "")):] or node).group(1))
        ptype = str(raw.get("type", "")).lower()
        if label == "dos" and ptype in EXTENDED:
            continue
        start, size = int(raw["start"]) * sector, int(raw["size"]) * sector
        if label == "gpt":
            partuuid = str(raw.get("uuid", "")).lower() or None
        else:  # dos: the disk signature and the partition number, as the kernel names it
            partuuid = f"{disk_id.removeprefix('0x'):0>8}-{index:02x}" if disk_id else None
        parts.append({"index": index, "start": start, "size": size, "type": ptype,
                      "partuuid": partuuid, "partlabel": raw.get("name")})
    if not parts:
        raise DamagedDisk(f"{name}: the {label} partition table has no partitions")
    for part in parts:
        end = part["start"] + part["size"]
        if part["size"] <= 0:
            raise DamagedDisk(f"{name}: partition {part['index']} is empty (size 0): corrupt table")
        if part["start"] < sector:
            raise DamagedDisk(f"{name}: partition {part['index']} starts at byte {part['start']}, "
                            "over the partition table: corrupt table")
        if end > disk_size:
            raise DamagedDisk(f"{name}: partition {part['index']} ends at byte {end}, past the end "
                            f"of the disk ({disk_size} bytes): the image is truncated or the "
                            "partition table is corrupt")
    ordered = sorted(parts, key=lambda p: p["start"])
    for before, after in zip(ordered, ordered[1:]):
        if after["start"] < before["start"] + before["size"]:
            raise DamagedDisk(f"{name}: partitions {before['index']} and {after['index']} overlap "
                            f"(bytes {after['start']}..{before['start'] + before['size']}): "
                            "corrupt partition table")
    return sorted(parts, key=lambda p: p["index"])


def probe(path, offset, size):
    """{'fstype', 'uuid', 'label'} of what blkid finds at [offset, offset+size)."""
    found = {"fstype": None, "uuid": None, "label": None}
    try:
        result = tools.run(["blkid", "-p", "-o", "export", "-O", offset, "-S", size, path], ok=(0, 2, 8))
    except tools.ToolError as exc:
        found["note"] = f"blkid failed: {exc}"
        return found
    if result.code == 2:  # nothing recognised: blkid says the same for a read error
        error = _read_error(path, offset, min(size, 1 << 20))
        if error:
            found["note"] = f"cannot read it ({error}): the image is damaged"
        return found
    if result.code == 8:  # more than one signature: a wiped-then-reformatted mess
        found["note"] = "ambivalent: more than one filesystem signature (blkid -p)"
        return found
    values = {}
    for line in result.stdout.splitlines():
        # Values are shell-escaped (`LVM2\ 001`): shlex undoes that.
        words = shlex.split(line, posix=True) if line else []
        if words and "=" in words[0]:
            key, _, value = words[0].partition("=")
            values[key] = value
    found.update(fstype=values.get("TYPE"), uuid=values.get("UUID"), label=values.get("LABEL"))
    return found


def _read_error(path, offset, size):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            f.read(size)
    except OSError as exc:
        return exc.strerror
    return None


def discover(disk, disk_type, name=None):
    """The filesystems.json entries of a raw disk or a bare filesystem."""
    name = name or disk
    entries = []
    if disk_type == "raw":
        for part in partition_table(disk, name):
            found = probe(disk, part["start"], part["size"])
            entries.append(_entry(part["index"], part["start"], part["size"], found,
                                  part["partuuid"], part["partlabel"]))
    elif disk_type == "partition":
        size = os.path.getsize(disk)
        found = probe(disk, 0, size)
        if not found["fstype"]:
            raise DamagedDisk(f"{name}: no filesystem found in this partition image "
                            f"({found.get('note') or 'blkid recognises none'})")
        entries.append(_entry(0, 0, size, found, None, None))
    else:
        raise DiskError(f"{name}: a {disk_type} image is not a disk the mounters read directly")
    return entries


def _entry(index, start, size, found, partuuid, partlabel):
    return {"index": index, "start": start, "size": size, "fstype": found["fstype"],
            "uuid": found["uuid"], "label": found["label"], "partuuid": partuuid,
            "partlabel": partlabel, "mountpoint": None, "root": False,
            "device": None, "note": found.get("note")}


def describe_fs(entry):
    where = f"partition {entry['index']}" if entry["index"] else "the filesystem"
    tags = [entry["fstype"] or "no filesystem"]
    if entry.get("label"):
        tags.append(f"LABEL={entry['label']}")
    return f"{where} ({', '.join(tags)})"


# -- state shared by the mounter hooks ----------------------------------------

def state_path():
    return os.path.join(os.environ["IMG_WORK_DIR"], "filesystems.json")


def load():
    """The filesystems.json entries; the first mounter step of a process makes them."""
    try:
        with open(state_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        pass
    name, disk_type = display_name(), os.environ.get("IMG_DISK_TYPE")
    entries = discover(current_disk(), disk_type, name)
    save(entries)
    if not os.environ.get("IMG_DISK"):  # else the container mounter said it
        warn_in_place()
    hooklib.describe(f"{name}: {disk_type} disk with {len(entries)} filesystem(s): "
                     + "; ".join(describe_fs(e) for e in entries))
    fault("discover")
    return entries


def save(entries):
    path = state_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# -- container formats: a raw view through qemu-storage-daemon ----------------

def check_container(path, fmt, name=None):
    """Refuse container images that reference any file but themselves (backing
    files, external data files, extents): qemuimg.check asks qemu, confined.
    Returns qemu-img info's dict; raises DiskError naming the reason."""
    try:
        return qemuimg.check(path, fmt, name or path)
    except (qemuimg.QemuImgError, confine.ConfineError) as exc:
        raise _disk_error(exc) from None


def _disk_error(exc):
    """A DiskError with the words of `exc`, still marked bad input if it was."""
    return (DamagedDisk if isinstance(exc, tools.BadInput) else DiskError)(str(exc))


def warn_in_place():
    """A writable mount of the user's own input changes that file: say so."""
    image, given = os.environ.get("IMG_IMAGE"), os.environ.get("IMG_INPUT")
    if writable() and image and given and os.path.realpath(image) == os.path.realpath(given):
        hooklib.warn(f"{image}: mounted writable: changes are written into this input file itself")


def qemu_check(path, fmt, name=None):
    """`qemu-img check` the metadata (fast: no data is read), confined to the
    image; corruption is an error.

    A truncated qcow2 opens fine and reads zeros where its clusters were;
    this is what catches it.
    """
    name = name or path
    result = confine.run(["qemu-img", "check", "--output=json", "--image-opts", qemuimg.image_opts(fmt)],
                         [confine.File(os.path.abspath(path), qemuimg.IMAGE)],
                         limits=qemuimg.INSPECT_LIMITS, timeout=qemuimg.INSPECT_TIMEOUT)
    if result.returncode in (0, 3, 63):  # clean, only leaked clusters, or no check for the format
        return
    if result.limit_hit:
        raise DamagedDisk(f"{name}: qemu-img check was stopped: {result.limit_hit} "
                        f"(a hostile or broken {fmt} image?)")
    errors = []
    for line in (result.stderr + "\n" + result.stdout).splitlines():
        line = line.strip()
        if line and not line.startswith(("{", "}", '"')):  # not the JSON report
            errors.append(qemuimg.qemu_message(line, name))
    detail = "; ".join(errors[:3]) or f"exit {result.returncode}"
    if len(errors) > 3:
        detail += f"; and {len(errors) - 3} more"
    if result.returncode == 2:
        raise DamagedDisk(f"{name}: the {fmt} image is corrupt or truncated (qemu-img check): {detail}")
    raise DamagedDisk(f"{name}: qemu rejects it as {fmt} (qemu-img check): {detail}")


def _wait_mounted(path, process, timeout=READY_TIMEOUT):
    """Wait until `path` is a mount point served by `process`; False if it exited."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return True
        if process.poll() is not None:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def _wait_served(path, process, timeout=READY_TIMEOUT):
    """Wait until the FUSE daemon answers for `path` (a stat blocks until it has
    taken the FUSE handshake); False if it exited or the time is up."""
    answered = threading.Event()

    def ask():
        with contextlib.suppress(OSError):
            os.stat(path)
            answered.set()
    threading.Thread(target=ask, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answered.wait(0.01):
            return True
        if process.poll() is not None:
            return answered.wait(0.5)
    return False


def export_raw(image, fmt, write=False, name=None):
    """Serve `image` (vmdk, qcow2, vhd, vhdx) as a raw file; returns its path.

    qemu-storage-daemon exports the image as a FUSE file in the work
    directory, confined (confine.py) to the image: we open /dev/fuse and mount
    it on the export file ourselves, and the daemon gets only that open
    descriptor (as the mount point /dev/fd/N, which libfuse takes as "already
    mounted").  The journal gets the export's removal, its unmount and the daemon.
    """
    name = name or image
    if fmt not in QEMU_DRIVERS:
        raise DiskError(f"{name}: {fmt} is not a format qemu-storage-daemon exports")
    journal, given = hooklib.journal(), image
    try:
        if write:  # a replayed copy would take the changes: refused below
            info = qemuimg.check(image, fmt, name)
        else:
            image, info = qemuimg.usable_image(image, fmt, name, os.environ.get("IMG_SCRATCH_DIR"),
                                               journal.add)
    except qemuimg.LogNeedsReplay as exc:
        raise DiskError(f"{exc}: replaying it would change this file, and changes to a replayed "
                        "copy would be lost: mount it read-only or convert it first") from None
    except (qemuimg.QemuImgError, confine.ConfineError) as exc:
        raise _disk_error(exc) from None
    if image != given:
        hooklib.warn(f"{name}: the {fmt} log was replayed on a copy in the scratch directory "
                     "(an unclean shutdown); the input is unchanged")
    create_type = ((info.get("format-specific") or {}).get("data") or {}).get("create-type")
    if write and fmt == "vmdk" and create_type == "streamOptimized":
        raise DiskError(f"{name}: a streamOptimized VMDK cannot be written in place (qemu writes "
                        "its compressed grains only in one sequential pass): convert it to qcow2 "
                        "or raw first to mount it writable")
    qemu_check(image, fmt, name)
    # In the work dir, not the scratch dir: the export is a view, not data we
    # wrote, and must not count against --scratch-limit.
    export = os.path.join(os.environ["IMG_WORK_DIR"], f"{fmt}-export-{uuidlib.uuid4().hex[:8]}.raw")
    node = {"driver": QEMU_DRIVERS[fmt], "node-name": "disk0", "read-only": not write,
            "file": {"driver": "file", "filename": f"{confine.INSIDE}/{qemuimg.IMAGE}",
                     "read-only": not write}}
    if fmt in ("qcow2", "vmdk"):
        node["backing"] = None
    files = [confine.File(os.path.abspath(image), qemuimg.IMAGE, write=write)]
    fuse_export([node], files, export, write, name, fmt, journal.add)
    fault("export")
    return export


def fuse_export(blockdevs, files, export, write, name, fmt, record):
    """Serve the last of `blockdevs` (qemu --blockdev dicts naming `files` by
    their sandbox paths) as the FUSE file `export`, by a confined
    qemu-storage-daemon; returns the daemon's Popen.

    We open /dev/fuse and mount it on the export file ourselves; the daemon
    gets only that open descriptor, as the mount point /dev/fd/N (libfuse
    takes it as "already mounted").  `record(action, **args)` journals: the
    export's removal, its unmount and the daemon (in that order, each before
    the resource exists).  The daemon's log is EXPORT.log.
    """
    log = export + ".log"
    record("remove", path=export)
    record("remove", path=log)
    with open(export, "w"):
        pass  # a FUSE export mounts over an existing regular file
    record("umount", path=export)
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        # rootmode: a regular file; only root (user_id 0) may use it.  subprocess, not
        # engine/tools.run: mount inherits the /dev/fuse descriptor (issue 11).
        try:
            result = subprocess.run(["mount", "-i", "-t", "fuse.qemu-storage-daemon", "-o",
                                     f"fd={fuse},rootmode=100000,user_id=0,group_id=0,nosuid,nodev,noexec",
                                     "qemu-storage-daemon", export], pass_fds=(fuse,), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", timeout=tools.TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DiskError(f"{name}: cannot mount the FUSE export: {exc}") from None
        if result.returncode:
            raise DiskError(f"{name}: cannot mount the FUSE export: mount failed "
                            f"(exit {result.returncode}): {tools.tail(result.stdout)}")
        argv = ["qemu-storage-daemon"]
        for node in blockdevs:
            argv += ["--blockdev", json.dumps(node)]
        argv += ["--export", json.dumps({"type": "fuse", "id": "export0",
                                         "node-name": blockdevs[-1]["node-name"],
                                         "mountpoint": f"/dev/fd/{fuse}", "writable": write})]
        with open(log, "wb") as out:
            process = confine.spawn_daemon(argv, files, fd_files=[fuse], limits=EXPORT_LIMITS,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        record("kill", pid=process.pid, group=True)
    finally:
        os.close(fuse)  # the daemon has its copy: when it dies, the mount stops answering
    if not _wait_served(export, process):
        process.poll()
        with open(log, errors="replace") as f:
            detail = qemuimg.qemu_message(" ".join(f.read(4096).split()), name)
        hit = confine.limit_hit(process.returncode, detail, EXPORT_LIMITS)
        if process.returncode is None:
            detail = f"no export after {READY_TIMEOUT} s. {detail}"
        raise DiskError(f"{name}: qemu cannot open it as {fmt}: "
                        f"{hit or detail or f'exit {process.returncode}'}")
    return process


# -- loop devices and mounts ---------------------------------------------------

def attach(path, offset, size, write=False):
    """A loop device for bytes [offset, offset+size) of `path`: (device, journal id)."""
    try:
        attached = hooklib.losetup(path, offset, size, readonly=not write)
    except hooklib.HookFailure as exc:
        raise DiskError(str(exc)) from exc
    fault("loop")
    return attached


def mount_options(fstype, write):
    options = ["rw" if write else "ro", "nodev", "nosuid"]
    if not write:
        # The loop device is read-only: never replay a journal.
        options += {"ext3": ["noload"], "ext4": ["noload"], "xfs": ["norecovery"],
                    "btrfs": ["rescue=nologreplay"]}.get(fstype, [])
    if fstype == "xfs":
        options.append("nouuid")  # a guest may share its UUID with a host filesystem
    return options


def mount_fs(disk, entry, target, write=False, extra=()):
    """Mount filesystem `entry` of `disk` at `target`; returns the journal ids
    that undo the mount.  The loop device stays (entry["device"]) for reuse."""
    fstype = entry["fstype"]
    ids = []
    if fstype in KERNEL_FS:
        device = _loop_for(disk, entry, write)
        try:
            ids.append(hooklib.mount(device, target, fstype, mount_options(fstype, write) + list(extra)))
        except hooklib.HookFailure as exc:
            raise _mount_error(exc, fstype, device, target) from None
    elif fstype == "ntfs":
        ids += _mount_ntfs(_loop_for(disk, entry, write), target, write)
    elif fstype == "vfat":
        ids += _mount_fat_copy(disk, entry, target)
    else:
        raise DiskError(f"{describe_fs(entry)}: no mounter for {fstype}")
    fault("mount")
    return ids


def _mount_error(exc, fstype, device, target):
    reason, host_fault = tools.mount_reason(str(exc), device, target)
    if host_fault:
        return DiskError(f"this host's kernel cannot mount {fstype}: {reason}")
    return DamagedDisk(f"the kernel cannot mount it as {fstype} (damaged?): {reason}")


def _loop_for(disk, entry, write):
    device = entry.get("device")
    if not device or not _loop_backs(device, disk, entry["start"]):
        device, _ = attach(disk, entry["start"], entry["size"], write)
        entry["device"] = device
    return device


def _last_id(journal):
    return journal.pending()[-1]["id"]


def _loop_backs(device, disk, offset):
    """Whether `device` is still our loop device for `disk` at `offset`."""
    sys_dir = f"/sys/block/{os.path.basename(device)}/loop"
    try:
        with open(f"{sys_dir}/backing_file") as f, open(f"{sys_dir}/offset") as g:
            return f.read().strip() == os.path.realpath(disk) and int(g.read()) == offset
    except (OSError, ValueError):
        return False


def _mount_ntfs(device, target, write):
    """ntfs-3g in the foreground (no_detach), so the journal holds its pid:
    SIGTERM makes it unmount and exit, which also frees the loop device."""
    os.makedirs(target, exist_ok=True)
    journal = hooklib.journal()
    log = os.path.join(os.environ["IMG_SCRATCH_DIR"], f"ntfs-3g-{uuidlib.uuid4().hex[:8]}.log")
    ids = [journal.add("remove", path=log), journal.add("umount", path=os.path.realpath(target))]
    options = ["rw" if write else "ro", "nodev", "nosuid", "no_detach"]
    with open(log, "wb") as out:
        process = hooklib.spawn(["ntfs-3g", "-o", ",".join(options), device, target],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd="/")
    ids.append(_last_id(journal))
    if not _wait_mounted(target, process):
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        raise DamagedDisk(f"ntfs-3g cannot mount it: {' '.join(lines[-3:]) or 'no mount appeared'}")
    fault("ntfs")
    return ids


# The FAT copy lives on its own small ext4 filesystem in the scratch space,
# whose size is the cap on the whole copy: a hostile FAT whose directory
# entries share one cluster chain (or loop) names far more bytes and files
# than it holds, and the kernel stops the copy at ENOSPC.
FAT_COPY_FACTOR = 2          # times the FAT's size: room for ext4's own blocks and small files
FAT_COPY_SLACK = 16 * 1024 * 1024


def fat_copy_limit(fat_size, scratch_free):
    """The most bytes a copy of a FAT of `fat_size` bytes may take."""
    return min(FAT_COPY_FACTOR * fat_size + FAT_COPY_SLACK, scratch_free)


def _mount_fat_copy(disk, entry, target, limit=None):
    """The mtools route: this kernel has no vfat, and the FUSE FAT drivers
    Debian ships are not reliable, so copy the (small) FAT filesystem out with
    mcopy onto a capped filesystem and bind the copy read-only at `target`.
    Changes are not written back, so a writable process gets a warning."""
    journal = hooklib.journal()
    scratch = os.environ["IMG_SCRATCH_DIR"]
    if limit is None:
        stat = os.statvfs(scratch)
        limit = fat_copy_limit(entry["size"], stat.f_bavail * stat.f_frsize)
    if limit < 1024 * 1024:
        raise DiskError(f"{describe_fs(entry)}: no room to copy it out: {limit} bytes free in {scratch}")
    name = f"fat-{entry['index']}-{uuidlib.uuid4().hex[:8]}"
    store, copy = os.path.join(scratch, name + ".ext4"), os.path.join(scratch, name)
    ids = [journal.add("remove", path=store), journal.add("remove", path=copy)]
    with open(store, "wb") as f:
        f.truncate(limit)
    # 1 KiB blocks: FAT clusters can be 512 bytes; one inode per 1 KiB of FAT
    # at most, which also ends a directory loop.
    inodes = max(1024, min(entry["size"] // 1024, limit // 2048))
    _run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-N", str(inodes), "-m", "0", "-O", "^has_journal",
          "-E", "lazy_itable_init=1,nodiscard", store], f"{describe_fs(entry)}: mkfs.ext4 for its copy")
    try:
        device, loop_id = hooklib.losetup(store, readonly=False)
    except hooklib.HookFailure as exc:
        raise DiskError(str(exc)) from exc
    ids.append(loop_id)
    ids.append(hooklib.mount(device, copy, "ext4", ("rw", "nodev", "nosuid", "noexec")))
    tree = os.path.join(copy, "fat")  # not the copy's root, which holds lost+found
    os.mkdir(tree)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null")
    # No file of a FAT can be larger than the FAT itself.
    file_limit = entry["size"]
    try:
        # `::/` copies the root directory's contents, hidden files included.
        tools.run(["mcopy", "-s", "-p", "-m", "-n", "-Q", "-i", f"{disk}@@{entry['start']}", "::/", tree + "/"],
                  f"{describe_fs(entry)}: mcopy", env=env,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit)))
    except tools.ToolError as exc:
        if "No space left on device" in exc.stderr:
            raise DamagedDisk(f"{describe_fs(entry)}: its files add up to more than {limit} bytes "
                              f"(the cap for a {entry['size']}-byte FAT): cross-linked or looping "
                              "directory entries; not copied") from None
        # mcopy ran and could not read the FAT: the image's fault; missing or hung: the host's.
        raise (DamagedDisk if exc.code else DiskError)(str(exc)) from None
    fault("fat-copy")
    if writable():
        hooklib.warn(f"{describe_fs(entry)} is FAT: it is mounted as a read-only copy, "
                     "changes to it are not written to the image")
    ids.append(hooklib.mount(tree, target, None, ("bind", "ro", "nodev", "nosuid")))
    return ids


def undo(ids):
    journal = hooklib.journal()
    for entry_id in reversed(ids):
        journal.undo(entry_id)


# -- the guest: root and fstab -------------------------------------------------

def classify_root(root):
    """'linux' (fstab and an init), 'fstab' (an fstab, no init yet), 'windows', or None."""
    guest = Guest(root)
    if guest.isfile("/etc/fstab"):
        return "linux" if any(guest.exists(init) for init in INITS) else "fstab"
    if detect_platform(root) == "windows":
        return "windows"
    return None


def read_fstab(root):
    """The entries of the guest's /etc/fstab (imaging_elements.mount.fstab.Entry); none, with
    a warning, when it cannot be read."""
    try:
        entries, _ = fstab.read(Guest(root))
    except (GuestPathError, fstab.FstabError) as exc:
        hooklib.warn(f"cannot read the guest's /etc/fstab: {exc}")
        return []
    return entries


def _unsupported(exc):
    return str(exc) + ("" if dm_available() else " (and this host has no device-mapper)")


# -- the mounter step --------------------------------------------------------------

def find_root(disk, entries, fstypes, mount_point, write):
    """Mount the filesystem of `fstypes` that holds an OS at `mount_point`.

    Largest first: the root is usually the biggest filesystem, so it is
    mostly found at the first try.  A rejected candidate keeps its loop
    device for a later fstab mount (it is released at the unwind anyway).
    """
    fallback = None
    for entry in sorted(entries, key=lambda e: -e["size"]):
        if entry["fstype"] not in fstypes or entry["mountpoint"] is not None:
            continue
        try:
            ids = mount_fs(disk, entry, mount_point, write)
        except InjectedFault:
            raise
        except DiskError as exc:
            entry["note"] = f"cannot be mounted: {exc}"
            entry["host_fault"] = not isinstance(exc, tools.BadInput)
            hooklib.warn(f"{display_name()}: {describe_fs(entry)} cannot be mounted: {exc}")
            continue
        kind, subvol = classify_root(mount_point), None
        if kind is None and entry["fstype"] == "btrfs":
            subvol = btrfs_root_subvolume(mount_point)
            if subvol:
                undo(ids)
                ids = mount_fs(disk, entry, mount_point, write, [f"subvol={subvol}"])
                kind = classify_root(mount_point)
        if kind in ("linux", "windows"):
            return _take_root(entry, kind, subvol)
        entry["note"] = ("has /etc/fstab but no init (" + ", ".join(INITS) + ")" if kind == "fstab"
                         else "no /etc/fstab with an init, nor a Windows directory")
        if kind == "fstab" and fallback is None:
            fallback = (entry, subvol)
        undo(ids)
    if fallback:  # perhaps /usr is a separate filesystem: the check hook looks again later
        entry, subvol = fallback
        mount_fs(disk, entry, mount_point, write, [f"subvol={subvol}"] if subvol else [])
        return _take_root(entry, "fstab", subvol)
    return None


def btrfs_root_subvolume(mount_point):
    """A top-level btrfs subvolume (e.g. `@`) holding the root, or None."""
    for name in sorted(os.listdir(mount_point)):
        path = os.path.join(mount_point, name)
        if not os.path.islink(path) and os.path.isdir(path) and classify_root(path):
            return name
    return None


_btrfs_root_subvolume = btrfs_root_subvolume  # instance.py's old name: drop when it calls the public one


def _take_root(entry, kind, subvol):
    entry.update(mountpoint="/", root=True, note=None)
    if subvol:
        entry["subvol"] = subvol
    platform = "windows" if kind == "windows" else "linux"
    current = os.environ.get("IMG_PLATFORM", "")
    if current in ("", "auto"):
        hooklib.set_var("IMG_PLATFORM", platform)
    elif current != platform:
        hooklib.warn(f"{display_name()}: the platform was given as {current}, "
                     f"but the image looks like {platform}")
    mode = "read-write" if writable() else "read-only"
    hooklib.describe(f"{display_name()}: mounted the {platform} root from {describe_fs(entry)} "
                     f"{mode} at {os.environ['IMG_MOUNT_POINT']}")
    fault("root")
    return entry


def mount_fstab(disk, entries, fstypes, mount_point, write, report):
    """Mount the guest's fstab entries whose filesystem is one of `fstypes`."""
    planned = []
    for line in read_fstab(mount_point):
        where = line.mountpoint
        if line.virtual or line.network or line.swap or line.bind:
            continue
        if line.relative:
            if report:
                hooklib.warn(f"{display_name()}: fstab line {line.lineno} ({line.spec} on {where}): "
                             "the mount point is not an absolute path; not mounted")
            continue
        try:
            entry, reason = fstab.resolve(line.spec, entries)
        except fstab.Unsupported as exc:
            raise DiskError(f"{display_name()}: fstab entry for {where}: {_unsupported(exc)}") from None
        if entry is None:
            if report and fstab.is_device(line.spec):
                hooklib.warn(f"{display_name()}: fstab entry for {where}: {reason}; not mounted")
            continue
        options = line.options
        if entry["fstype"] == "LVM2_member":
            raise DiskError(f"{display_name()}: fstab entry for {where}: {describe_fs(entry)} is "
                            "an LVM physical volume: LVM inside images is not supported")
        if where == "/" or entry["root"] and not [o for o in options if o.startswith("subvol")]:
            continue
        if entry["fstype"] not in fstypes:
            if report and entry["fstype"] not in FUSE_FS and entry["fstype"] not in KERNEL_FS:
                hooklib.warn(f"{display_name()}: fstab entry for {where}: {describe_fs(entry)} "
                             "cannot be mounted here; not mounted")
            continue
        planned.append((where, entry, [o for o in options if o.startswith("subvol")]))
    # Parents before children: /boot before /boot/efi.
    for where, entry, extra in sorted(planned, key=lambda p: len(p[0].rstrip("/").split("/"))):
        try:
            target = Guest(mount_point).resolve(where)
        except GuestPathError as exc:
            hooklib.warn(f"{display_name()}: cannot mount {describe_fs(entry)} at {where}: {exc}")
            continue
        if not os.path.isdir(target):
            hooklib.warn(f"{display_name()}: cannot mount {describe_fs(entry)} at {where}: "
                         "not a directory in the image")
            continue
        mount_fs(disk, entry, target, write, extra)
        if entry["mountpoint"] is None:
            entry["mountpoint"] = where
        hooklib.describe(f"{display_name()}: mounted {describe_fs(entry)} at {where}")
        fault("fstab")


def mount_step(fstypes):
    """One mounter hook: find the root among `fstypes` if none is mounted yet,
    then mount the guest fstab entries on filesystems of `fstypes`."""
    disk = current_disk()
    mount_point = os.environ["IMG_MOUNT_POINT"]
    os.makedirs(mount_point, exist_ok=True)
    write = writable()
    entries = load()
    try:
        root = next((e for e in entries if e["root"]), None)
        found_here = False
        if root is None:
            root = find_root(disk, entries, fstypes, mount_point, write)
            found_here = root is not None
        if root is not None and classify_root(mount_point) != "windows":
            # The hook that mounted the root reports fstab entries nobody can mount.
            mount_fstab(disk, entries, fstypes, mount_point, write,
                        report=found_here or root["fstype"] in fstypes)
    finally:
        save(entries)


def check():
    """The final word of the mount phase: a root is mounted, or a clear error."""
    name, disk_type = display_name(), os.environ.get("IMG_DISK_TYPE")
    if disk_type not in ("raw", "partition"):
        raise DiskError(f"{name}: a {disk_type} image was not turned into a raw disk: "
                        "add the mount-qemu-fuse element (needs qemu-storage-daemon)")
    try:
        with open(state_path()) as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise DiskError(f"{name}: no mounter ran for this {disk_type} disk: add mount-disk, "
                        "mount-partition or mount-ntfs (or the mounters element)") from None
    root = next((e for e in entries if e["root"]), None)
    if root is None:
        reasons, input_fault = [], True
        for entry in entries:
            if entry["fstype"] == "LVM2_member":
                why = ("an LVM physical volume: LVM inside images is not supported"
                       + ("" if dm_available() else " (no device-mapper on this host)"))
                input_fault = False
            elif entry["fstype"] in FUSE_FS and not entry.get("note"):
                why = f"not tried: add the {FUSE_FS[entry['fstype']]} element"
                input_fault = False
            elif entry["fstype"] is None:
                why = entry.get("note") or "no filesystem"
            else:
                why = entry.get("note") or "not tried"
                input_fault = input_fault and not entry.get("host_fault")
            reasons.append(f"{describe_fs(entry)}: {why}")
        # Bad input (exit 3) only when nothing was left untried for the host's or the
        # element list's sake: then it is the image that holds no usable root.
        raise (DamagedDisk if input_fault else DiskError)(
            f"{name}: no recognisable root (no /etc/fstab with an init, no Windows "
            f"directory): {'; '.join(reasons)}")
    mount_point = os.environ["IMG_MOUNT_POINT"]
    if classify_root(mount_point) == "fstab":
        raise DamagedDisk(f"{name}: the root ({describe_fs(root)}) has /etc/fstab but no init "
                        f"({', '.join(INITS)}), even with the guest's fstab mounted")
    for line in (read_fstab(mount_point) if root["fstype"] != "ntfs" else []):
        if line.virtual or line.network or line.mountpoint == "/":
            continue
        try:
            entry, _ = fstab.resolve(line.spec, entries)
        except fstab.Unsupported:
            continue
        if entry and entry["fstype"] in FUSE_FS and entry["mountpoint"] is None:
            hooklib.warn(f"{name}: {line.mountpoint} ({describe_fs(entry)}) is not mounted: add the "
                         f"{FUSE_FS[entry['fstype']]} element")
    mounted = ", ".join(f"{e['mountpoint']} ({describe_fs(e)})" for e in entries if e["mountpoint"])
    hooklib.describe(f"{name}: mounted {mounted}")


# -- the hooks' entry point ---------------------------------------------------------

def export_step():
    """mount-qemu-fuse: the container as a raw file; IMG_DISK and IMG_DISK_TYPE for the next."""
    from imaging_elements.engine import imagetype
    image = os.environ.get("IMG_DISK") or os.environ.get("IMG_IMAGE")
    fmt = os.environ.get("IMG_DISK_TYPE")
    warn_in_place()
    export = export_raw(image, fmt, write=writable(), name=image)
    inner = imagetype.detect(export)
    if inner not in ("raw", "partition"):
        raise DamagedDisk(f"{image}: the {fmt} image holds neither a partition table nor a "
                        f"filesystem (its content looks {inner})")
    hooklib.set_var("IMG_DISK", export)
    hooklib.set_var("IMG_DISK_TYPE", inner)
    hooklib.describe(f"{image}: {fmt} exported as a raw view ({inner}, "
                     f"{os.path.getsize(export)} bytes) at {export}")


COMMANDS = {
    "export": export_step,
    "mount-kernel": lambda: mount_step(KERNEL_FS),
    "mount-ntfs": lambda: mount_step(("ntfs",)),
    "mount-vfat": lambda: mount_step(("vfat",)),
    "check": check,
}


def main(argv=None):
    """`python -m imaging_elements.mount.disk COMMAND`: what the mounter hooks run
    (they are bash, so that a hook with nothing to do costs no Python start)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m imaging_elements.mount.disk {{{'|'.join(COMMANDS)}}}")
    sys.argv[1:] = []  # hooklib.main's verb: run
    hooklib.main(lambda: _reporting(COMMANDS[argv[0]]))


def _reporting(step):
    """Run a mounter step; an error that is the image's fault is reported as bad input."""
    try:
        step()
    except tools.BadInput as exc:
        hooklib.bad_input(exc)


if __name__ == "__main__":
    main()
