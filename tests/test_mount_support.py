"""Shared by the tests/test_mount*.py modules; holds no tests itself.

* `image(name)`: real test images (sfdisk, mke2fs -d, mkfs.xfs, mkfs.btrfs,
  mkfs.vfat + mtools, mkntfs + ntfs-3g, pvcreate, qemu-img convert), built
  once per test process in a temporary directory that is removed at exit.
* `MountRun`: runs the stock mounters' mount.d hooks over an image exactly as
  euca-image-process does (the engine collects them, decides `accepts` and runs
  each one: tests/hookcall.py; `set` status lines change the state of the hooks
  that follow), so a test can look at the mounted tree, then unwinds the
  cleanup journal.
"""

import atexit
import ctypes
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time

from imaging_elements.engine import elements, hooks
from imaging_elements.sdk.journal import Journal
from tests import hookcall, imagebuild
from tests.base import ROOT
from tests.imagebuild import MiB, sh

ELEMENTS = os.path.join(ROOT, "elements")
MOUNTERS = ("mount-qemu-fuse", "mount-common", "mount-disk", "mount-partition", "mount-ntfs", "mount-fat")
KERNEL = "6.1.0-test"

BOOT_UUID = "0b0070b0-1111-4222-8333-444455556666"
XFS_UUID = "c0ffee00-1111-4222-8333-444455556666"
ESP_PARTUUID = "e5e5e5e5-aaaa-4bbb-8ccc-dddddddddddd"

_lock = threading.RLock()
_dir = None
_built = {}


def _cache():
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="test-mount-images-", dir="/var/tmp")
        atexit.register(shutil.rmtree, _dir, True)
    return _dir


def image(name):
    """Path of test image `name` (see BUILDERS), built on first use."""
    with _lock:
        if name not in _built:
            directory = os.path.join(_cache(), name)
            os.makedirs(directory)
            _built[name] = BUILDERS[name](directory)
        return _built[name]


def copy(name, dest_dir):
    """A private copy of image `name` (sparse), for tests that damage or write it."""
    src = image(name)
    dest = os.path.join(dest_dir, os.path.basename(src))
    sh("cp", "--sparse=always", src, dest)
    return dest


# -- builders ----------------------------------------------------------------------

def _linux_root(directory, fstab, extra=None):
    tree = os.path.join(directory, "root-tree")
    imagebuild.linux_tree(tree, fstab=fstab, kernel=KERNEL, extra=extra)
    return tree


def _linux_dos(d):
    """MBR disk: 1 = /boot (ext4, by UUID), 2 = / (ext4, LABEL=rootfs)."""
    boot = imagebuild.write_tree(os.path.join(d, "boot-tree"), {
        f"vmlinuz-{KERNEL}": b"kernel", f"initrd.img-{KERNEL}": b"initrd",
        "grub/grub.cfg": "set default=0\n", "from-boot-partition": "yes\n"})
    fstab = ("# /etc/fstab: static file system information.\n"
             "LABEL=rootfs / ext4 errors=remount-ro 0 1\n"
             f"UUID={BOOT_UUID} /boot ext4 defaults 0 2\n"
             "proc /proc proc defaults 0 0\n"
             "tmpfs /tmp tmpfs defaults 0 0\n"
             "/dev/sda3 none swap sw 0 0\n")
    tree = _linux_root(d, fstab)
    for name in os.listdir(os.path.join(tree, "boot")):
        os.unlink(os.path.join(tree, "boot", name))  # /boot is the other partition
    imagebuild.make_fs(os.path.join(d, "boot.ext4"), boot, "ext4", 16 * MiB, label="boot", uuid=BOOT_UUID)
    imagebuild.make_fs(os.path.join(d, "root.ext4"), tree, "ext4", 32 * MiB, label="rootfs")
    return imagebuild.make_disk(os.path.join(d, "linux-dos.raw"), [
        {"image": os.path.join(d, "boot.ext4"), "bootable": True},
        {"image": os.path.join(d, "root.ext4")}])


def make_vfat(path, tree, size=64 * MiB, label="EFI"):
    """A FAT32 filesystem image populated with mtools (the kernel here has no vfat)."""
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkfs.vfat", "-F", "32", "-n", label, path)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for name in sorted(os.listdir(tree)):
        sh("mcopy", "-s", "-i", path, os.path.join(tree, name), "::/", env=env)
    return path


def _linux_gpt(d):
    """GPT disk: 1 = ESP (FAT32, by PARTUUID), 2 = / (xfs, by UUID), 3 = /var (btrfs, by PARTLABEL)."""
    esp = imagebuild.write_tree(os.path.join(d, "esp-tree"), {
        "EFI/debian/grubx64.efi": b"MZ grub stand-in", "EFI/BOOT/BOOTX64.EFI": b"MZ shim stand-in"})
    var = imagebuild.write_tree(os.path.join(d, "var-tree"), {"log/from-var-partition": "yes\n"})
    fstab = (f"UUID={XFS_UUID} / xfs defaults 0 1\n"
             f"PARTUUID={ESP_PARTUUID} /boot/efi vfat umask=0077 0 1\n"
             "PARTLABEL=var /var btrfs defaults 0 0\n")
    tree = _linux_root(d, fstab, extra={"boot/efi": ("dir",)})
    make_vfat(os.path.join(d, "esp.vfat"), esp)
    imagebuild.make_fs(os.path.join(d, "root.xfs"), tree, "xfs", 300 * MiB, label="root", uuid=XFS_UUID)
    imagebuild.make_fs(os.path.join(d, "var.btrfs"), var, "btrfs", 128 * MiB, label="var")
    return imagebuild.make_disk(os.path.join(d, "linux-gpt.raw"), [
        {"image": os.path.join(d, "esp.vfat"), "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
         "name": "EFI system", "uuid": ESP_PARTUUID},
        {"image": os.path.join(d, "root.xfs"), "name": "root"},
        {"image": os.path.join(d, "var.btrfs"), "name": "var"}], label="gpt")


def cross_link_fat(path, copies):
    """Make `copies` more root directory entries of a FAT12/16 image point at
    the cluster chain (and size) of its first file, as a hostile image would:
    the FAT then names `copies` times more bytes than it holds."""
    with open(path, "r+b") as f:
        boot = f.read(512)
        sector, _, reserved, fats, root_entries = struct.unpack_from("<HBHBH", boot, 11)
        fat_sectors = struct.unpack_from("<H", boot, 22)[0]
        root = (reserved + fats * fat_sectors) * sector
        f.seek(root)
        table = bytearray(f.read(root_entries * 32))
        slots = range(0, len(table), 32)
        first = next(i for i in slots if table[i] not in (0, 0xE5) and not table[i + 11] & 0x08)
        free = [i for i in slots if table[i] in (0, 0xE5)][:copies]
        assert len(free) == copies, "not enough free root directory entries"
        for n, i in enumerate(free):
            table[i:i + 32] = f"X{n:07d}BIN".encode() + table[first + 11:first + 32]
        f.seek(root)
        f.write(table)


def _fat_bomb(d):
    """GPT disk: 1 = a 16 MiB FAT16 ESP whose 14 MiB file is named by 40 more
    directory entries (about 600 MB to copy out), 2 = / (ext4) mounting it at /boot/efi."""
    path = os.path.join(d, "esp.vfat")
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    sh("mkfs.vfat", "-F", "16", "-n", "EFI", path)
    big = os.path.join(d, "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(14 * MiB))
    sh("mcopy", "-i", path, big, "::/BIG.BIN", env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    cross_link_fat(path, 40)
    fstab = f"LABEL=rootfs / ext4 defaults 0 1\nPARTUUID={ESP_PARTUUID} /boot/efi vfat umask=0077 0 1\n"
    tree = _linux_root(d, fstab, extra={"boot/efi": ("dir",)})
    imagebuild.make_fs(os.path.join(d, "root.ext4"), tree, "ext4", 32 * MiB, label="rootfs")
    return imagebuild.make_disk(os.path.join(d, "fat-bomb.raw"), [
        {"image": path, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "name": "EFI system",
         "uuid": ESP_PARTUUID},
        {"image": os.path.join(d, "root.ext4"), "name": "root"}], label="gpt")


def _ami_ext4(d):
    """A partition image (the AMI case): fstab names /dev/xvda1 and an ephemeral /dev/xvdb."""
    fstab = "/dev/xvda1 / ext4 defaults 0 0\n/dev/xvdb /mnt auto defaults,nofail 0 2\n"
    tree = _linux_root(d, fstab, extra={"mnt": ("dir",)})
    return imagebuild.make_fs(os.path.join(d, "ami.ext4"), tree, "ext4", 32 * MiB, label="cloudimg-rootfs")


def _xfs_partition(d):
    tree = _linux_root(d, "LABEL=xfsroot / xfs defaults 0 0\n")
    return imagebuild.make_fs(os.path.join(d, "root.xfs"), tree, "xfs", 300 * MiB, label="xfsroot")


def _btrfs_subvolume(d):
    """A btrfs partition image whose root is the subvolume `@` (Ubuntu, openSUSE layout)."""
    path = imagebuild.make_fs(os.path.join(d, "root.btrfs"), None, "btrfs", 128 * MiB, label="btrroot")
    uuid = sh("blkid", "-p", "-o", "value", "-s", "UUID", path).strip()
    tree = _linux_root(d, f"UUID={uuid} / btrfs subvol=@ 0 0\n")
    with imagebuild.mounted(path, os.path.join(d, "mnt"), "btrfs") as mnt:
        sh("btrfs", "-q", "subvolume", "create", os.path.join(mnt, "@"))
        sh("cp", "-a", tree + "/.", os.path.join(mnt, "@"))
    return path


def make_ntfs(path, tree, size=24 * MiB, label="Windows"):
    """An NTFS image: mkntfs, then filled through ntfs-3g run in the foreground,
    so that it has surely exited (and let go of the file) when we return."""
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkntfs", "-q", "-F", "-f", "-L", label, path)
    mnt = tempfile.mkdtemp(prefix="ntfs-", dir=os.path.dirname(path))
    daemon = subprocess.Popen(["ntfs-3g", "-o", "no_detach", path, mnt],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.ismount(mnt):
            if daemon.poll() is not None:
                raise RuntimeError(f"ntfs-3g {path} exited {daemon.returncode}")
            time.sleep(0.01)
        sh("cp", "-r", tree + "/.", mnt)
    finally:
        subprocess.run(["umount", mnt])
        daemon.wait(timeout=30)
        os.rmdir(mnt)
    return path


def _windows(d):
    """MBR disk: 1 = "System Reserved" NTFS, 2 = the Windows NTFS volume."""
    reserved = imagebuild.write_tree(os.path.join(d, "reserved-tree"), {
        "bootmgr": b"bootmgr stand-in", "Boot/BCD": b"regf"})
    windows = imagebuild.write_tree(os.path.join(d, "windows-tree"), {
        "Windows/System32/config/SYSTEM": b"regf", "Windows/System32/config/SOFTWARE": b"regf",
        "Windows/System32/drivers/viostor.sys": b"MZ", "Users/Public/desktop.ini": "x\n"})
    make_ntfs(os.path.join(d, "reserved.ntfs"), reserved, 8 * MiB, "System Reserved")
    make_ntfs(os.path.join(d, "windows.ntfs"), windows, 24 * MiB, "Windows")
    return imagebuild.make_disk(os.path.join(d, "windows.raw"), [
        {"image": os.path.join(d, "reserved.ntfs"), "type": "7", "bootable": True},
        {"image": os.path.join(d, "windows.ntfs"), "type": "7"}])


def _lvm(d):
    """MBR disk: 1 = /boot (ext4), 2 = an LVM physical volume (VG vg0) holding the root."""
    boot = imagebuild.write_tree(os.path.join(d, "boot-tree"), {f"vmlinuz-{KERNEL}": b"kernel"})
    imagebuild.make_fs(os.path.join(d, "boot.ext4"), boot, "ext4", 16 * MiB, label="boot")
    path = imagebuild.make_disk(os.path.join(d, "lvm.raw"), [
        {"image": os.path.join(d, "boot.ext4")}, {"image": None, "size": 16 * MiB, "type": "8e"}])
    part = imagebuild.partitions(path)[1]
    device = sh("losetup", "--find", "--show", "--offset", part["start"],
                "--sizelimit", part["size"], path).strip()
    # No backups in /etc/lvm, no devices file: leave nothing on the host.
    config = "backup{backup=0 archive=0} devices{use_devicesfile=0}"
    try:
        sh("pvcreate", "-qq", "--config", config, device)
        sh("vgcreate", "-qq", "--config", config, "vg0", device)
    finally:
        sh("losetup", "-d", device)
    return path


def _no_root(d):
    """A disk with one ext4 partition of plain data: no /etc/fstab, no init."""
    data = imagebuild.write_tree(os.path.join(d, "data"), {"README": "just data\n"})
    imagebuild.make_fs(os.path.join(d, "data.ext4"), data, "ext4", 16 * MiB, label="data")
    return imagebuild.make_disk(os.path.join(d, "no-root.raw"), [{"image": os.path.join(d, "data.ext4")}])


def _no_init(d):
    """/etc/fstab but no init anywhere."""
    tree = imagebuild.write_tree(os.path.join(d, "tree"), {"etc/fstab": "LABEL=half / ext4 defaults 0 1\n",
                                                          "etc/hostname": "half\n"})
    imagebuild.make_fs(os.path.join(d, "half.ext4"), tree, "ext4", 16 * MiB, label="half")
    return imagebuild.make_disk(os.path.join(d, "no-init.raw"), [{"image": os.path.join(d, "half.ext4")}])


def _format(source, fmt, options=None, name=None):
    def build(d):
        return imagebuild.qemu_convert(image(source), os.path.join(d, name or f"{source}.{fmt}"), fmt, options)
    return build


BUILDERS = {
    "linux-dos": _linux_dos,
    "linux-gpt": _linux_gpt,
    "ami-ext4": _ami_ext4,
    "xfs-partition": _xfs_partition,
    "btrfs-subvolume": _btrfs_subvolume,
    "windows": _windows,
    "lvm": _lvm,
    "no-root": _no_root,
    "no-init": _no_init,
    "fat-bomb": _fat_bomb,
    "vmdk-stream": _format("linux-dos", "vmdk", "subformat=streamOptimized"),
    "vmdk-sparse": _format("linux-dos", "vmdk", "subformat=monolithicSparse"),
    "vmdk-flat": _format("linux-dos", "vmdk", "subformat=monolithicFlat"),
    "qcow2": _format("linux-dos", "qcow2"),
    "vhd": _format("linux-dos", "vpc", "subformat=dynamic", "linux-dos.vhd"),
    "vhd-fixed": _format("linux-dos", "vpc", "subformat=fixed", "linux-dos-fixed.vhd"),
    "vhdx": _format("linux-dos", "vhdx"),
    "ami-qcow2": _format("ami-ext4", "qcow2"),
}


# -- running the mounters as the runner does ----------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on):
    """Daemons a hook leaves (qemu-storage-daemon, ntfs-3g) are orphans.  Here
    PID 1 reaps orphans only about once a second, and the journal waits for a
    killed daemon to be reaped; as their subreaper, the journal's own waitpid
    reaps them at once, as it would on a host whose init reaps promptly."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)


def reap_orphans():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class MountRun:
    """The mount phase of one image, hook by hook, run by the engine as a process runs it
    (tests/hookcall.py: runner.run_hook), with its own work directory."""

    def __init__(self, work, image_path, disk_type, elements=MOUNTERS, env=None):
        self.work = work
        self.env = hookcall.state(work, IMG_INPUT=image_path, IMG_IMAGE=image_path, IMG_IMAGE_TYPE=disk_type,
                                  IMG_DISK_TYPE=disk_type, IMG_PLATFORM="auto", IMG_MOUNT_WRITABLE="0",
                                  IMG_ELEMENTS=" ".join(elements))
        self.env.update(env or {})
        self.elements = elements
        self.journal = Journal(self.env["IMG_JOURNAL"])
        self.describes, self.warnings, self.ran, self.declined = [], [], [], {}
        self.failure = None
        self.log = []

    @property
    def mount_point(self):
        return self.env["IMG_MOUNT_POINT"]

    def hooks(self):
        """The mount.d hooks of the elements (and what they depend on), as a process collects them."""
        resolved = elements.resolve(list(self.elements), elements.find_elements(""))
        found, _ = hooks.collect("mount", resolved)
        return found

    def run(self):
        """Run the hooks in order until one fails; returns True if all passed."""
        _subreaper(True)
        for hook in self.hooks():
            ok, reason = hookcall.accepts(hook, self.env)
            if not ok:
                self.declined[hook.name] = reason
                continue
            ran = hookcall.run(hook, self.env, timeout=120)  # its `set` lines change self.env
            self.ran.append(hook.name)
            self.describes += ran.said["describe"]
            self.warnings += ran.said["warn"]
            self.log += ran.output + ran.warnings
            if ran.code:
                self.failure = ran.failure
                self.failed_hook = hook.name
                return False
        return True

    def filesystems(self):
        with open(os.path.join(self.work, "filesystems.json")) as f:
            return json.load(f)

    def mounts(self):
        """{guest path: (source, fstype, options)} of what is mounted under the mount point."""
        real = os.path.realpath(self.mount_point)
        found = {}
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = fields[4].replace("\\040", " ")
                if point == real or point.startswith(real + "/"):
                    after = fields[fields.index("-") + 1:]
                    options = set(fields[5].split(",")) | set(after[2].split(","))
                    guest = "/" + os.path.relpath(point, real).removeprefix(".")
                    found[guest] = (after[1], after[0], options)
        return found

    def unwind(self):
        try:
            return self.journal.unwind()
        finally:
            reap_orphans()
            _subreaper(False)


# -- test elements for runs through euca-image-process --------------------------------

SHOW_TREE = '''#!/usr/bin/env python3
#@ description: test element: write what the mounters mounted to $IMG_SHOW_OUT (JSON)
import json, os
root = os.path.realpath(os.environ["IMG_MOUNT_POINT"])
mounts = {}
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        point = fields[4]
        if point == root or point.startswith(root + "/"):
            after = fields[fields.index("-") + 1:]
            guest = "/" + os.path.relpath(point, root).removeprefix(".")
            mounts[guest] = [after[0], sorted(set(fields[5].split(",")) | set(after[2].split(",")))]
files = sorted("/" + os.path.relpath(os.path.join(d, n), root)
               for d, _, names in os.walk(root) for n in names)
with open(os.path.join(os.environ["IMG_WORK_DIR"], "filesystems.json")) as f:
    filesystems = json.load(f)
with open(os.environ["IMG_SHOW_OUT"], "w") as f:
    json.dump({"platform": os.environ["IMG_PLATFORM"], "mounts": mounts, "files": files,
               "filesystems": filesystems}, f)
'''

HOLD = '''#!/usr/bin/env python3
#@ description: test element: with everything mounted, say so in $IMG_HOLD_READY and wait
#@ accepts-disk-type: *
import os, time
with open(os.environ["IMG_HOLD_READY"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
'''


def test_elements(directory):
    """Elements `show-tree` (validate.d) and `hold-mount` (mount.d, last) under `directory`."""
    for element, phase, name, text, option in (
            ("show-tree", "validate.d", "50-show-tree", SHOW_TREE, "SHOW_OUT"),
            ("hold-mount", "mount.d", "99-hold-mount", HOLD, "HOLD_READY")):
        path = os.path.join(directory, element, phase, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        with open(os.path.join(directory, element, "README.md"), "w") as f:
            f.write(f"# {element}: a test element of tests/test_mount*.py\n")
        with open(os.path.join(directory, element, "element-options.json"), "w") as f:
            json.dump({option: {"type": "path", "description": "the file the test reads"}}, f)
    return directory
