"""Partition (AMI) image -> bootable raw disk.

The filesystem is copied (sparsely, with progress) into a new disk at 1 MiB
behind an MBR partition table; the copy -- never the input -- is then attached
through a loop device at that offset, grown if asked, mounted writable
(nodev, nosuid, noexec) and given extlinux from Debian's package, a boot entry
and an fstab whose root is found by UUID or label, so the disk boots under any
device name. External kernel and ramdisk files (an AMI's aki/ari) go to /boot.

Paths inside the image are resolved as the guest sees them (resolve_in_root):
an absolute symlink in the image points into the image, never to the host.
"""

import errno
import os
import re
import shutil
import signal
import sys
import tempfile

from imaging_elements.engine import imagetype, tools
from imaging_elements.sdk import hooklib
from imaging_elements.convert import qemuimg
from imaging_elements.guest import guest

MiB = 1 << 20
START = MiB                                   # the partition's offset
MBR_CODE = "/usr/lib/EXTLINUX/mbr.bin"
MBR_CODE_SIZE = 440                           # boot code, before the disk id and the table
# Filesystems extlinux boots from -> the type to mount them with.
BOOTABLE = {"ext": "ext4", "xfs": "xfs", "btrfs": "btrfs"}
EXTERNAL_KERNEL = "/boot/vmlinuz-external"
EXTERNAL_RAMDISK = "/boot/initrd.img-external"


class BootDiskError(Exception):
    pass


class DamagedFilesystem(BootDiskError, tools.BadInput):
    """The filesystem image is at fault (damaged, hostile paths inside): exit 3."""


# -- paths inside the image ------------------------------------------------------

def resolve_in_root(root, path, follow_last=True):
    """The host path of the guest path `path`, resolving symlinks as if `root` were '/';
    None when a directory on the way is missing."""
    try:
        return guest.Guest(root).resolve(path, follow=follow_last, must_exist=False)
    except guest.GuestPathError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise DamagedFilesystem(f"in the image: {exc}") from exc


def guest_path(root, host_path):
    return "/" + os.path.relpath(host_path, root) if host_path != root else "/"


def write_file(root, path, source=None, data=None, mode=0o644):
    """Write a file in the image atomically (temp + rename), never through a symlink."""
    target = resolve_in_root(root, path)
    if target is None:
        raise DamagedFilesystem(f"{path}: its directory is missing in the image")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise DamagedFilesystem(f"{path}: {guest_path(root, directory)} is not a directory in the image")
    if os.path.isdir(target) and not os.path.islink(target):
        raise DamagedFilesystem(f"{path}: is a directory in the image")
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".img-")
    try:
        with os.fdopen(fd, "wb") as f:
            if source:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 4 * MiB)
            else:
                f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(temp, target)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return target


def read_text(root, path):
    target = resolve_in_root(root, path)
    if target is None or not os.path.isfile(target):
        return None
    with open(target, "rb") as f:
        return f.read(1 << 20).decode("utf-8", errors="replace")


def is_bzimage(path):
    """x86 boot protocol header: what extlinux can load."""
    with open(path, "rb") as f:
        f.seek(0x202)
        return f.read(4) == b"HdrS"


# -- the image's kernel ----------------------------------------------------------

def _version_key(name):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def find_kernel(root):
    """(kernel, ramdisk or None) as guest paths: /vmlinuz's target, else the newest in /boot."""
    for link, rd_link in (("/vmlinuz", "/initrd.img"), ("/boot/vmlinuz", "/boot/initrd.img")):
        kernel = resolve_in_root(root, link)
        if kernel and os.path.isfile(kernel) and not os.path.islink(kernel):
            ramdisk = resolve_in_root(root, rd_link)
            if ramdisk and os.path.isfile(ramdisk):
                return guest_path(root, kernel), guest_path(root, ramdisk)
            return guest_path(root, kernel), _ramdisk_for(os.path.dirname(kernel), kernel, root)
    boot = resolve_in_root(root, "/boot")
    if not os.path.isdir(boot):
        return None, None
    names = [n for n in os.listdir(boot)
             if re.match(r"(vmlinuz|bzImage|kernel)-.", n) and not n.endswith((".old", ".sig"))
             and os.path.isfile(os.path.join(boot, n)) and not os.path.islink(os.path.join(boot, n))]
    if not names:
        return None, None
    kernel = os.path.join(boot, max(names, key=_version_key))
    return guest_path(root, kernel), _ramdisk_for(boot, kernel, root)


def _ramdisk_for(directory, kernel, root):
    """The initramfs that goes with kernel file `kernel` (same version), as a guest path."""
    name = os.path.basename(kernel)
    if "-" not in name:
        return None
    version = name.split("-", 1)[1]
    for candidate in (f"initrd.img-{version}", f"initrd-{version}.img", f"initramfs-{version}.img",
                      f"initrd-{version}"):
        full = os.path.join(directory, candidate)
        if os.path.isfile(full) and not os.path.islink(full):
            return guest_path(root, full)
    return None


# -- fstab -----------------------------------------------------------------------

def root_entry_matches(spec, ids):
    spec = spec.strip('"')
    names = {f"UUID={ids.get('UUID')}", f"LABEL={ids.get('LABEL')}", f"PARTUUID={ids.get('PARTUUID')}",
             f"/dev/disk/by-uuid/{ids.get('UUID')}", f"/dev/disk/by-label/{ids.get('LABEL')}",
             f"/dev/disk/by-partuuid/{ids.get('PARTUUID')}"}
    return spec in {n for n in names if not n.endswith("=None") and not n.endswith("/None")}


def fix_fstab(text, ids, fstype):
    """(new fstab text, what changed or None): the '/' entry names this filesystem."""
    lines = (text or "").splitlines()
    wanted = f"UUID={ids['UUID']}"
    for index, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] == "/":
            changes = []
            if not root_entry_matches(fields[0], ids):
                changes.append(f"root entry {fields[0]} -> {wanted}")
                fields[0] = wanted
            if len(fields) >= 3 and fields[2] not in (fstype, "auto"):
                changes.append(f"root type {fields[2]} -> {fstype}")
                fields[2] = fstype
            if not changes:
                return text, None
            lines[index] = "\t".join(fields)
            return "\n".join(lines) + "\n", ", ".join(changes)
    lines.append(f"{wanted}\t/\t{fstype}\tdefaults\t0\t1")
    return "\n".join(lines) + "\n", f"added root entry {wanted}"


# -- the conversion --------------------------------------------------------------

def filesystem_of(path):
    with open(path, "rb") as f:
        return imagetype.filesystem(f.read(65536 + 4096))


def disk_layout(fs_bytes, requested=None):
    """(disk size, partition size) in bytes: the partition at 1 MiB fills the disk."""
    disk = START + (fs_bytes + MiB - 1) // MiB * MiB
    if requested:
        if requested < disk:
            raise BootDiskError(f"IMG_SIZE={requested} bytes is smaller than the filesystem "
                                f"({fs_bytes} bytes) plus the 1 MiB before the partition ({disk} bytes)")
        disk = requested // 512 * 512
    return disk, disk - START


def write_partition_table(path, disk_id, part_bytes):
    table = (f"label: dos\nlabel-id: 0x{disk_id:08x}\n"
             f"start={START // 512}, size={part_bytes // 512}, type=83, bootable\n")
    tools.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", path], input=table)
    with open(MBR_CODE, "rb") as f:
        code = f.read(MBR_CODE_SIZE)
    with open(path, "r+b") as f:
        f.write(code)


def attach(path, offset, size):
    """A writable loop device on a slice of `path`; returns (device, journal id)."""
    return hooklib.losetup(path, offset, size, readonly=False)


def blkid(device):
    out = tools.run(["blkid", "-p", "-o", "export", device]).stdout
    ids = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if not ids.get("UUID"):
        raise DamagedFilesystem(f"blkid finds no UUID on the filesystem ({device}); cannot name the root")
    return ids


def grow_offline(fs, device):
    if fs == "ext":
        try:
            tools.run(["e2fsck", "-f", "-p", device], ok=(0, 1))  # 1: errors fixed
        except tools.ToolError as exc:
            if exc.code is None:  # missing or hung: the host's problem
                raise
            raise DamagedFilesystem(f"e2fsck found errors it cannot fix alone; not growing: {exc}") from None
        tools.run(["resize2fs", device])


def grow_mounted(fs, mount_point, part_bytes):
    if fs == "xfs":
        tools.run(["xfs_growfs", mount_point])
    elif fs == "btrfs":
        if part_bytes < 256 * MiB:   # the kernel refuses to resize btrfs below that
            hooklib.warn(f"btrfs is not resized below 256 MiB: the filesystem keeps its size "
                         f"in the {part_bytes} byte partition")
            return
        tools.run(["btrfs", "filesystem", "resize", "max", mount_point])


def extlinux_conf(kernel, ramdisk, root_arg, extra):
    append = " ".join(filter(None, [root_arg, "ro", "console=tty0", "console=ttyS0,115200n8", extra]))
    return ("# Written by euca-image-process (partition-to-disk)\n"
            "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\n\n"
            f"LABEL linux\n  LINUX {kernel}\n" + (f"  INITRD {ramdisk}\n" if ramdisk else "") +
            f"  APPEND {append}\n")


def install_boot(root, fs, ids, disk_id, kernel_file=None, ramdisk_file=None, cmdline=""):
    """Boot files, fstab and extlinux in the mounted filesystem; returns what was done."""
    done = []
    if kernel_file:
        boot = resolve_in_root(root, "/boot")
        os.makedirs(boot, exist_ok=True)
        write_file(root, EXTERNAL_KERNEL, source=kernel_file)
        kernel, ramdisk = EXTERNAL_KERNEL, None
        if ramdisk_file:
            write_file(root, EXTERNAL_RAMDISK, source=ramdisk_file)
            ramdisk = EXTERNAL_RAMDISK
        done.append(f"placed {kernel_file} at {kernel}" + (f" and {ramdisk_file} at {ramdisk}" if ramdisk else ""))
    else:
        kernel, ramdisk = find_kernel(root)
        if ramdisk_file and kernel:
            write_file(root, EXTERNAL_RAMDISK, source=ramdisk_file)
            ramdisk = EXTERNAL_RAMDISK
            done.append(f"placed {ramdisk_file} at {ramdisk}")

    fstab = read_text(root, "/etc/fstab")
    if os.path.isdir(resolve_in_root(root, "/etc")):
        text, change = fix_fstab(fstab, ids, BOOTABLE[fs])
        if change:
            write_file(root, "/etc/fstab", data=text.encode())
            done.append(f"fstab: {change}")
        else:
            done.append("fstab root entry already names this filesystem")
    else:
        hooklib.warn("the image has no /etc: no fstab written")

    if not kernel:
        hooklib.warn("no kernel in the image's /boot and no IMG_KERNEL given: the disk will not boot")
        return done, None
    if not is_bzimage(resolve_in_root(root, kernel)):
        hooklib.warn(f"{kernel} in the image is not an x86 bzImage: the disk may not boot")
    # With an initramfs, udev finds the filesystem by UUID; without one the
    # kernel itself must find the root, and it knows MBR partition ids.
    if ramdisk:
        root_arg = f"root=UUID={ids['UUID']}"
    else:
        root_arg = f"root=PARTUUID={disk_id:08x}-01 rootfstype={BOOTABLE[fs]} rootwait"
    directory = resolve_in_root(root, "/boot/extlinux")
    os.makedirs(directory, exist_ok=True)
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise DamagedFilesystem("/boot/extlinux in the image is not a directory")
    write_file(root, "/boot/extlinux/extlinux.conf",
               data=extlinux_conf(kernel, ramdisk, root_arg, cmdline).encode())
    tools.run(["extlinux", "--install", directory])
    done.append(f"extlinux boots {kernel}" + (f" with {ramdisk}" if ramdisk else "") + f", {root_arg}")
    return done, kernel


def convert(source, output, size=None, kernel_file=None, ramdisk_file=None, cmdline="",
            scratch=None, progress=None):
    """Make the bootable disk `output` from the filesystem image `source`; returns a description."""
    fs = filesystem_of(source)
    if fs not in BOOTABLE:
        raise DamagedFilesystem(f"{source}: holds {'a ' + fs if fs else 'no known'} filesystem; "
                            f"a bootable disk needs one of {', '.join(sorted(BOOTABLE))}")
    for name, path in (("IMG_KERNEL", kernel_file), ("IMG_RAMDISK", ramdisk_file)):
        if path and not os.path.isfile(path):
            raise BootDiskError(f"{name}={path}: no such file")
    if kernel_file and not is_bzimage(kernel_file):
        raise BootDiskError(f"IMG_KERNEL={kernel_file}: not an x86 bzImage kernel (no HdrS header); "
                            "extlinux cannot boot it")
    fs_bytes = os.path.getsize(source)
    if fs_bytes % 512:
        raise DamagedFilesystem(f"{source}: {fs_bytes} bytes is not a whole number of 512-byte sectors")
    disk_bytes, part_bytes = disk_layout(fs_bytes, size)
    disk_id = int.from_bytes(os.urandom(4), "little") or 1
    journal = hooklib.journal()
    try:
        with open(output, "wb") as f:
            f.truncate(disk_bytes)
        write_partition_table(output, disk_id, part_bytes)
        qemuimg.convert(source, "partition", output, "raw", progress=progress,
                        target_opts=f"driver=raw,offset={START},size={fs_bytes}")

        device, loop_entry = attach(output, START, part_bytes)
        with hooklib.undoing(loop_entry):
            grown = part_bytes >= fs_bytes + MiB
            if grown:
                grow_offline(fs, device)
            mount_point = tempfile.mkdtemp(prefix="partition-to-disk-", dir=scratch)
            dir_entry = journal.add("remove", path=mount_point)
            with hooklib.undoing(dir_entry):
                options = ["rw", "nodev", "nosuid", "noexec"] + (["nouuid"] if fs == "xfs" else [])
                with hooklib.undoing(_mount(device, mount_point, BOOTABLE[fs], options)):
                    if grown:
                        grow_mounted(fs, mount_point, part_bytes)
                    ids = blkid(device)
                    ids["PARTUUID"] = f"{disk_id:08x}-01"
                    done, _ = install_boot(mount_point, fs, ids, disk_id, kernel_file, ramdisk_file, cmdline)
                    tools.run(["sync", "-f", mount_point])
    except hooklib.HookFailure as exc:   # a tool failed: say which image it was working on
        _remove(output)
        raise BootDiskError(f"{source}: {exc}") from exc
    except BaseException:
        _remove(output)
        raise
    grown_text = f", grown from {fs_bytes} bytes" if grown else ""
    return (f"wrapped the {ids.get('TYPE', fs)} filesystem of {source} in an MBR disk of {disk_bytes} "
            f"bytes (partition at 1 MiB{grown_text}); " + "; ".join(done))


def _mount(device, target, fstype, options):
    try:
        return hooklib.mount(device, target, fstype, options)
    except hooklib.HookFailure as exc:
        reason, host_fault = tools.mount_reason(str(exc), device, target)
        if host_fault:
            raise
        raise DamagedFilesystem(f"the kernel cannot mount it as {fstype} (damaged?): {reason}") from None


def _remove(path):
    if os.path.lexists(path):
        os.unlink(path)


def required_bytes(source, size=None, kernel_file=None, ramdisk_file=None):
    """Bytes the conversion writes, at most: the filesystem's data, boot files, growth metadata."""
    need = qemuimg.data_bytes(source, "partition", 4096) + START + MiB
    for path in (kernel_file, ramdisk_file):
        if path and os.path.isfile(path):
            need += os.path.getsize(path)
    fs_bytes = os.path.getsize(source)
    if size and size > fs_bytes:
        need += (size - fs_bytes) // 32   # new groups' bitmaps and inode tables
    return need


# -- the hook --------------------------------------------------------------------

def _options():
    env = os.environ
    size = qemuimg.parse_size(env["IMG_SIZE"]) if env.get("IMG_SIZE") else None
    return size, env.get("IMG_KERNEL") or None, env.get("IMG_RAMDISK") or None


def hook_run():
    env = os.environ
    # SIGTERM raises, so that the with-blocks unmount and detach in order.
    signal.signal(signal.SIGTERM, qemuimg.terminate)
    try:
        size, kernel, ramdisk = _options()
        text = convert(env["IMG_IMAGE"], env["IMG_CONVERT_OUTPUT"], size, kernel, ramdisk,
                       env.get("IMG_KERNEL_CMDLINE", ""), env.get("IMG_SCRATCH_DIR"), hooklib.progress)
    except qemuimg.Terminated:
        sys.exit(143)
    except (BootDiskError, qemuimg.QemuImgError, OSError) as exc:
        message = str(exc)
        message = message if message.startswith(env["IMG_IMAGE"]) else f"{env['IMG_IMAGE']}: {message}"
        (hooklib.bad_input if isinstance(exc, tools.BadInput) else hooklib.fail)(message)
    hooklib.describe(text)


def hook_accepts():
    image = os.environ.get("IMG_IMAGE")
    if not os.path.isfile(MBR_CODE):
        return f"needs {MBR_CODE} (Debian package extlinux), not found"
    if image and os.path.isfile(image):
        try:
            fs = filesystem_of(image)
        except OSError as exc:
            return f"{image}: cannot read: {exc.strerror}"
        if fs not in BOOTABLE:
            return (f"{image} holds {'a ' + fs if fs else 'no known'} filesystem; extlinux boots "
                    f"only {', '.join(sorted(BOOTABLE))}")
    return True


def hook_required_capacity():
    try:
        size, kernel, ramdisk = _options()
        return required_bytes(os.environ["IMG_IMAGE"], size, kernel, ramdisk)
    except (BootDiskError, qemuimg.QemuImgError) as exc:
        tools.report(exc)
