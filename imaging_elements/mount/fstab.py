"""A guest's /etc/fstab, and which filesystem of the image an fstab device names.

One parser and one resolver for the mounters (disk.py) and the validators
(20-linux-fstab): inputs are arguments, nothing is read from the environment.
A device name is resolved against the image's own filesystems (the list the
mounters write to filesystems.json: dicts with index, uuid, label, partuuid,
partlabel, fstype, root), never against the host's devices.
"""

import re

from imaging_elements.guest.guest import decode_text, is_binary

VIRTUAL_FS = frozenset({
    "proc", "sysfs", "devpts", "tmpfs", "devtmpfs", "securityfs", "cgroup", "cgroup2", "debugfs", "tracefs",
    "pstore", "efivarfs", "mqueue", "hugetlbfs", "configfs", "fusectl", "binfmt_misc", "autofs",
    "rpc_pipefs", "nfsd", "usbfs", "shm", "none", "bpf", "ramfs", "selinuxfs"})
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smbfs", "smb3", "glusterfs", "ceph", "fuse.sshfs", "sshfs", "davfs", "9p",
    "virtiofs", "afs", "lustre"})
TAGS = {"UUID": "uuid", "LABEL": "label", "PARTUUID": "partuuid", "PARTLABEL": "partlabel"}
# Case does not matter in these (blkid prints them lower-case, users write either).
FOLDED = ("uuid", "partuuid")
# The guest's first disk under the names its kernel may give it.
DISK_NAME = re.compile(r"/dev/(?:(?:s|h|v|xv)d([a-z]+)(\d*)|nvme(\d+)n1(?:p(\d+))?|mmcblk(\d+)(?:p(\d+))?)")


class FstabError(ValueError):
    pass


class Unsupported(ValueError):
    """An LVM or device-mapper name: images with volume groups are not supported."""


class Entry:
    def __init__(self, lineno, spec, mountpoint, fstype="auto", options=("defaults",)):
        self.lineno, self.spec, self.mountpoint = lineno, spec, mountpoint
        self.fstype, self.options = fstype, list(options)

    @property
    def swap(self):
        return self.fstype == "swap"

    @property
    def optional(self):
        return "nofail" in self.options or "noauto" in self.options

    @property
    def bind(self):
        return "bind" in self.options or "rbind" in self.options

    @property
    def network(self):
        return self.fstype in NETWORK_FS or self.spec.startswith("//") or bool(re.match(r"^[\w.-]+:/",
                                                                                           self.spec))

    @property
    def virtual(self):
        return self.fstype in VIRTUAL_FS or self.spec in VIRTUAL_FS

    @property
    def relative(self):
        """A mount point that is not an absolute path (swap entries say `none`)."""
        return not self.swap and not self.mountpoint.startswith("/")

    def __repr__(self):
        return f"{self.spec} {self.mountpoint} {self.fstype}"


def unescape(field):
    """fstab's octal escapes: `\\040` is a space."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text):
    """(entries, problems): a problem is a readable line for each line that is not an entry."""
    entries, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2 or "\ufffd" in stripped or any(ord(c) < 32 and c != "\t" for c in stripped):
            problems.append(f"line {lineno} is not an fstab entry: {stripped[:60]!r}")
            continue
        entries.append(Entry(lineno, unescape(fields[0]), unescape(fields[1]),
                             fields[2] if len(fields) > 2 else "auto",
                             fields[3].split(",") if len(fields) > 3 else ["defaults"]))
    return entries, problems


def read(guest, path="/etc/fstab"):
    """parse() of the guest's fstab, read through `guest` (an imaging_elements.guest.guest.Guest).

    Raises GuestPathError (missing, too large, a link out of the image) or
    FstabError (binary data) with a message naming the file."""
    data = guest.read_bytes(path)
    if is_binary(data):
        raise FstabError(f"{path} is not a text file (it holds binary data)")
    return parse(decode_text(data))


def is_device(spec):
    """Whether `spec` names a block device (as opposed to a virtual, network or bind source)."""
    key = spec.partition("=")[0].upper()
    return key in TAGS and "=" in spec or spec.startswith("/dev/")


def resolve(spec, filesystems, partition_image=None):
    """(fs, None) when `spec` names a filesystem of this image, else (None, reason).

    `partition_image`: the image is one bare filesystem (an AMI), seen by the
    guest as its first disk's first partition; by default, whether the list
    holds a filesystem with index 0 (what the mounters give a bare one).
    Raises Unsupported for LVM and device-mapper names.
    """
    if partition_image is None:
        partition_image = any(fs.get("index") == 0 for fs in filesystems)
    by = value = None
    if "=" in spec and not spec.startswith("/"):
        key, _, value = spec.partition("=")
        by, value = TAGS.get(key.upper()), value.strip("\"'")
        if by is None:
            return None, f"{spec}: unknown device tag {key}="
    else:
        match = re.fullmatch(r"/dev/disk/by-([a-z]+)/(.+)", spec)
        if match and match.group(1) in TAGS.values():
            # udev writes unsafe characters of a label as \xNN: by-label/my\x20disk.
            by = match.group(1)
            value = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), match.group(2))
        elif match:
            return None, (f"{spec}: /dev/disk/by-{match.group(1)} names depend on the machine's "
                          "hardware; use UUID= or LABEL=")
    if by:
        for fs in filesystems:
            have = fs.get(by)
            if have and (have.lower() == value.lower() if by in FOLDED else have == value):
                return fs, None
        known = sorted({str(fs.get(by)) for fs in filesystems if fs.get(by)})
        return None, (f"{spec} matches no filesystem of this image "
                      f"(its {by.upper()}s: {', '.join(known) if known else 'none'})")
    if spec == "/dev/root":  # the kernel's name for the filesystem it booted from
        roots = [fs for fs in filesystems if fs.get("root")]
        return (roots[0], None) if roots else (None, "/dev/root: no root filesystem found")
    match = DISK_NAME.fullmatch(spec)
    if match:
        letters, number, nvme_disk, nvme_part, mmc_disk, mmc_part = match.groups()
        first = letters == "a" if letters is not None else int(nvme_disk or mmc_disk) == 0
        part = number or nvme_part or mmc_part
        if not first:
            return None, f"{spec} is on a disk other than the first; this image is one disk"
        if partition_image:
            # An AMI's filesystem is the instance's /dev/sda1 (or xvda1, vda1, or the whole xvda).
            if len(filesystems) == 1 and part in ("1", "", None):
                return filesystems[0], None
            return None, f"{spec}: a partition image has one filesystem, seen as partition 1"
        if not part:
            return None, f"{spec} is the whole disk, which holds a partition table, not a filesystem"
        for fs in filesystems:
            if str(fs.get("index")) == part:
                return fs, None
        return None, f"{spec}: this image has no partition {part}"
    if spec.startswith("/dev/mapper/") or re.fullmatch(r"/dev/[^/]+/[^/]+", spec) \
            and not spec.startswith(("/dev/disk/", "/dev/md/")):
        raise Unsupported(f"{spec} is an LVM (device-mapper) name: logical volumes inside images "
                          "are not supported")
    return None, f"{spec}: not a device this image can provide"
