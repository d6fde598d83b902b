"""Build small real images for tests: filesystems, partitioned disks, formats.

Everything here calls the standard tools (mke2fs -d, mkfs.xfs, sfdisk,
qemu-img), so the images are as real as a user's.
"""

import contextlib
import json
import os
import random
import subprocess

MiB = 1024 * 1024
CACHE = os.environ.get("IMG_TEST_CACHE", "/var/cache/imaging-elements")
HERE = os.path.dirname(os.path.abspath(__file__))


def sh(*argv, **kwargs):
    return subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs).stdout


def random_file(path, mib, seed):
    """`mib` MiB of seeded random bytes: data that does not compress."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MiB))
    return path


def write_tree(root, files):
    """files: {relative path: text or bytes, or ('symlink', target)}."""
    for rel, content in files.items():
        path = os.path.join(root, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(content[1], path)
        elif isinstance(content, tuple) and content[0] == "dir":
            os.makedirs(path, exist_ok=True)
        else:
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(path, mode) as f:
                f.write(content)
    return root


def linux_tree(root, fstab="LABEL=rootfs / ext4 defaults 0 1\n", kernel="6.1.0-test", extra=None):
    """A minimal Linux root that looks real to a validator (no binaries run)."""
    files = {
        "etc/fstab": fstab,
        "etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                          'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n',
        "etc/debian_version": "12.8\n",
        "etc/hostname": "testguest\n",
        "etc/network/interfaces": "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n",
        "sbin/init": ("symlink", "/lib/systemd/systemd"),
        "lib/systemd/systemd": b"\x7fELF-not-really\n",
        f"boot/vmlinuz-{kernel}": b"kernel",
        f"boot/initrd.img-{kernel}": b"initrd",
        f"lib/modules/{kernel}/modules.dep": "",
        "usr/sbin/sshd": b"\x7fELF",
        "var/tmp": ("dir",),
        "tmp": ("dir",),
    }
    files.update(extra or {})
    return write_tree(root, files)


def make_fs(path, tree=None, fstype="ext4", size=32 * MiB, label=None, uuid=None):
    """A filesystem image file, populated from the directory `tree`."""
    with open(path, "wb") as f:
        f.truncate(size)
    if fstype.startswith("ext"):
        argv = ["mke2fs", "-q", "-F", "-t", fstype]
        argv += ["-L", label] if label else []
        argv += ["-U", uuid] if uuid else []
        argv += ["-d", tree] if tree else []
        sh(*argv, path)
    elif fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-f"] + (["-L", label] if label else [])
        argv += ["-m", f"uuid={uuid}"] if uuid else []
        if tree:
            argv += ["-p", _xfs_protofile(tree, path + ".proto")]
        sh(*argv, path)
    elif fstype == "btrfs":
        argv = ["mkfs.btrfs", "-q", "-f"] + (["-L", label] if label else [])
        argv += ["-U", uuid] if uuid else []
        argv += ["--rootdir", tree] if tree else []
        sh(*argv, path)
    else:
        raise ValueError(f"make_fs: no recipe for {fstype}")
    return path


def _xfs_protofile(tree, proto_path):
    """mkfs.xfs -p takes a prototype file listing the tree."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(directory, depth):
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            st = os.lstat(full)
            pad = " " * depth
            if os.path.islink(full):
                lines.append(f"{pad}{name} l--777 0 0 {os.readlink(full)}")
            elif os.path.isdir(full):
                lines.append(f"{pad}{name} d--{st.st_mode & 0o777:o} 0 0")
                walk(full, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{name} ---{st.st_mode & 0o777:o} 0 0 {full}")

    walk(tree, 1)
    lines.append("$")
    with open(proto_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return proto_path


def make_disk(path, partitions, label="dos", size=None):
    """A partitioned disk image.

    partitions: list of dicts {"image": fs image path, "type": sfdisk type
    (default "83" for dos, Linux filesystem for gpt), "bootable": bool,
    "size": bytes (default: the image's size), and for gpt "name" (the
    PARTLABEL) and "uuid" (the PARTUUID)}. Partitions start at 1 MiB and
    follow each other, 1 MiB aligned.
    """
    start = MiB
    lines = [f"label: {label}"]
    layout = []
    for part in partitions:
        psize = part.get("size") or os.path.getsize(part["image"])
        psize = (psize + MiB - 1) // MiB * MiB
        ptype = part.get("type") or ("83" if label == "dos" else "0FC63DAF-8483-4772-8E79-3D69D8477DE4")
        line = f"start={start // 512}, size={psize // 512}, type={ptype}"
        if part.get("bootable"):
            line += ", bootable"
        if part.get("name"):
            line += f', name="{part["name"]}"'
        if part.get("uuid"):
            line += f", uuid={part['uuid']}"
        lines.append(line)
        layout.append((start, part.get("image")))
        start += psize
    total = size or start + MiB  # room for the GPT backup header
    with open(path, "wb") as f:
        f.truncate(total)
    sh("sfdisk", "--quiet", path, input="\n".join(lines) + "\n")
    with open(path, "r+b") as disk:
        for offset, image in layout:
            if image:
                _copy_sparse(image, disk, offset)
    return path


def _copy_sparse(src_path, dst, offset):
    with open(src_path, "rb") as src:
        while True:
            chunk = src.read(4 * MiB)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                dst.seek(offset)
                dst.write(chunk)
            offset += len(chunk)


@contextlib.contextmanager
def mounted(image, mnt, fstype=None):
    """A filesystem image mounted (read-write, nodev, nosuid) at `mnt` for a with-block."""
    os.makedirs(mnt, exist_ok=True)
    loop = sh("losetup", "--find", "--show", image).strip()
    try:
        sh("mount", *(["-t", fstype] if fstype else []), "-o", "nodev,nosuid", loop, mnt)
        try:
            yield mnt
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)


def partitions(path):
    """sfdisk's view of a disk: list of {start, size, type...} in bytes."""
    table = json.loads(sh("sfdisk", "--json", path))["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [dict(p, start=p["start"] * sector, size=p["size"] * sector) for p in table["partitions"]]


def qemu_convert(src, dst, fmt, options=None):
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if options:
        argv += ["-o", options]
    sh(*argv, src, dst)
    return dst


def debian_tarball():
    """The cached Debian 12 root made by tests/images/mkdebian (built on first use)."""
    return sh(os.path.join(HERE, "images", "mkdebian")).strip().splitlines()[-1]


def debian_tree(dest):
    """Unpack the cached Debian 12 root into `dest` (numeric owners kept)."""
    os.makedirs(dest, exist_ok=True)
    sh("tar", "-x", "--numeric-owner", "-f", debian_tarball(), "-C", dest)
    return dest


# -- bootable Debian 12 images (the instance validators boot them) -------------

DEBIAN_BOOT_RECIPE = 1  # part of the cache names: bump it when the recipe below changes
MBR_CODE = "/usr/lib/EXTLINUX/mbr.bin"  # syslinux's MBR boot code (Debian package extlinux)


def _cached(name, build):
    """CACHE/name, made once by build(temporary path), under a lock: test workers run in parallel."""
    import fcntl
    path = os.path.join(CACHE, name)
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, f".lock-{name}"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            temp = f"{path}.partial-{os.getpid()}"
            try:
                build(temp)
                os.replace(temp, path)
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
    return path


def _debian_key():
    st = os.stat(debian_tarball())
    return f"{st.st_size}-{int(st.st_mtime)}-r{DEBIAN_BOOT_RECIPE}"


def debian_root_fs():
    """The Debian 12 root as a bare ext4 filesystem, LABEL=rootfs (cached).

    The AMI case: its kernel and initrd are in /boot; it also carries
    extlinux (installed, with /boot/extlinux/extlinux.conf booting that kernel
    with root=LABEL=rootfs and the console on ttyS0), so that debian_boot_disk()
    only has to put it behind an MBR.
    """
    import shutil
    import tempfile

    def build(out):
        work = tempfile.mkdtemp(dir=CACHE, prefix=".debian-root-")
        try:
            root = debian_tree(os.path.join(work, "root"))
            version = sorted(os.listdir(os.path.join(root, "usr", "lib", "modules")))[-1]
            write_tree(root, {"boot/extlinux/extlinux.conf": (
                "DEFAULT debian\nPROMPT 0\nTIMEOUT 0\n\nLABEL debian\n"
                f"  LINUX /boot/vmlinuz-{version}\n  INITRD /boot/initrd.img-{version}\n"
                "  APPEND root=LABEL=rootfs ro console=ttyS0,115200\n")})
            make_fs(out, root, size=640 * MiB, label="rootfs")
            shutil.rmtree(root)
            with mounted(out, os.path.join(work, "mnt")) as mnt:
                sh("extlinux", "--install", os.path.join(mnt, "boot", "extlinux"))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return _cached(f"debian12-root-{_debian_key()}.ext4", build)


def debian_boot_disk():
    """A bootable Debian 12 raw disk (cached): an MBR with syslinux's boot code and
    one active partition at 1 MiB holding debian_root_fs() (extlinux, ttyS0 console)."""
    def build(out):
        make_disk(out, [{"image": debian_root_fs(), "bootable": True}])
        with open(MBR_CODE, "rb") as code, open(out, "r+b") as disk:
            disk.write(code.read(440))  # boot code only: the disk id and the table stay

    return _cached(f"debian12-boot-{_debian_key()}.raw", build)


def debian_kernel_files():
    """(kernel, initrd) of the Debian 12 root as separate files (cached): an AMI's aki and ari."""
    import shutil
    import tarfile
    found = []
    with tarfile.open(debian_tarball()) as tar:
        for prefix in ("./boot/vmlinuz-", "./boot/initrd.img-"):
            member = next(m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile())

            def build(out, member=member):
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)

            found.append(_cached(f"debian12-{_debian_key()}-{os.path.basename(member.name)}", build))
    return found


def dirty_vhdx(raw, path, attempts=60):
    """`raw` as a VHDX whose metadata log needs replaying (as after a host crash),
    or None if none could be made.  qemu-io writes zeros over zero blocks of the
    disk (allocating VHDX blocks, each through the log, without changing the
    guest's data) and is killed at growing delays until the log is left dirty."""
    import time
    zero = bytes(4096)
    offsets = []
    with open(raw, "rb") as f:
        for offset in range(0, os.path.getsize(raw), 1 << 20):
            f.seek(offset)
            if f.read(4096) == zero:
                offsets.append(offset)
    commands = []
    for offset in offsets[:400]:
        commands += ["-c", f"write -P 0 {offset} 4k"]
    for attempt in range(attempts):
        qemu_convert(raw, path, "vhdx", "block_size=1M")
        process = subprocess.Popen(["qemu-io", "-f", "vhdx", *commands, path],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.002 * (attempt % 30 + 1))
        process.kill()
        process.wait()
        info = subprocess.run(["qemu-img", "info", "-f", "vhdx", path], capture_output=True, text=True,
                              check=False)
        if "log that needs to be replayed" in info.stderr:
            return path
    return None
