"""Build guest images for the validator and inspection tests.

Linux: `linux_root()` is tests.imagebuild.linux_tree made complete for the
validators (an executable init, a boot loader configuration, sshd enabled,
cloud-init); `debian_vmdk()` is the real Debian 12 root of tests/images/mkdebian
as a whole disk in a streamOptimized VMDK, cached beside the tarball.

Windows: registry hives and an NTFS filesystem.

Registry hives: no Debian or PyPI package ships an empty hive and hivex cannot
create one from nothing, so `empty_hive()` writes the smallest valid "regf"
file (a base block, one 4 KiB hive bin holding the root key and its security
cell, the rest a free cell; layout as documented in hivex's lib/hivex-internal.h
and the "Windows registry file format specification" by Maxim Suhanov).  Every
key and value after that is written by hivex itself (`hivexsh -w`), and the
hooks read them back with `hivexget`: our bytes are only the empty shell, which
hivex validates (checksum, bins, cells) when it opens it.

NTFS: `mkntfs` on a file, populated through ntfs-3g (FUSE), unmounted again.
"""

import os
import shutil
import struct
import subprocess
import tempfile

from tests.imagebuild import (CACHE, MiB, debian_tarball, debian_tree, linux_tree, make_disk, make_fs,
                              qemu_convert, sh, write_tree)

KERNEL = "6.1.0-test"


def linux_root(root, kernel=KERNEL, fstab=None, extra=None, remove=()):
    """A small Linux root that passes every validator.

    Called again on the same root, it only applies the changes: `remove`
    deletes paths, then `extra` adds or replaces files ({path: content |
    ("symlink", target) | ("dir",)}) and `fstab` replaces /etc/fstab.
    """
    if not os.path.isdir(os.path.join(root, "etc")):
        linux_tree(root, kernel=kernel, extra={
            "boot/extlinux/extlinux.conf": (f"DEFAULT linux\nLABEL linux\n  LINUX /boot/vmlinuz-{kernel}\n"
                                            f"  INITRD /boot/initrd.img-{kernel}\n"
                                            "  APPEND root=LABEL=rootfs ro console=ttyS0,115200n8\n"),
            "etc/systemd/system/multi-user.target.wants/ssh.service": ("symlink", "/lib/systemd/system/ssh.service"),
            "lib/systemd/system/ssh.service": "[Service]\nExecStart=/usr/sbin/sshd -D\n",
            "usr/bin/cloud-init": "#!/usr/bin/python3\n",
            "usr/bin/python3": b"\x7fELF\x02\x01\x01",
            "etc/cloud/cloud.cfg": "datasource_list: [Ec2, None]\n",
            # An ELF header for x86_64 (e_machine 62), as the inspection reads it.
            "bin/bash": b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8 + b"\x02\x00\x3e\x00",
        })
        for path in ("lib/systemd/systemd", "usr/bin/cloud-init"):
            os.chmod(os.path.join(root, path), 0o755)
    changes = dict(extra or {})
    if fstab is not None:
        changes["etc/fstab"] = fstab
    for path in list(remove) + list(changes):
        full = os.path.join(root, path.lstrip("/"))
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)
    write_tree(root, changes)
    return root


def linux_disk(path, workdir, size=24 * MiB, **changes):
    """A raw whole-disk image (dos label, one ext4 partition labelled rootfs)."""
    tree = linux_root(tempfile.mkdtemp(dir=workdir), **changes)
    fs = make_fs(path + ".ext4", tree, size=size, label="rootfs")
    make_disk(path, [{"image": fs, "bootable": True}])
    os.unlink(fs)
    shutil.rmtree(tree)
    return path


def debian_vmdk():
    """The Debian 12 root as a bootable-looking disk in a streamOptimized VMDK (cached).

    The mkdebian root has no boot loader, so an extlinux.conf naming its kernel
    is added (as the partition-to-disk converter writes one); nothing else changes.
    """
    tarball = debian_tarball()
    st = os.stat(tarball)
    out = os.path.join(CACHE, f"debian12-validate-{st.st_size}-{int(st.st_mtime)}.vmdk")
    if os.path.exists(out):
        return out
    work = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".debian-vmdk-")
    try:
        root = debian_tree(os.path.join(work, "root"))
        version = sorted(os.listdir(os.path.join(root, "usr", "lib", "modules")))[-1]
        os.makedirs(os.path.join(root, "boot", "extlinux"), exist_ok=True)
        with open(os.path.join(root, "boot", "extlinux", "extlinux.conf"), "w") as f:
            f.write(f"DEFAULT debian\nLABEL debian\n  LINUX /boot/vmlinuz-{version}\n"
                    f"  INITRD /boot/initrd.img-{version}\n"
                    "  APPEND root=LABEL=rootfs ro console=ttyS0,115200n8\n")
        fs = make_fs(os.path.join(work, "root.ext4"), root, size=512 * MiB, label="rootfs")
        shutil.rmtree(root)
        raw = make_disk(os.path.join(work, "disk.raw"), [{"image": fs, "bootable": True}])
        os.unlink(fs)
        qemu_convert(raw, os.path.join(work, "disk.vmdk"), "vmdk", "subformat=streamOptimized")
        os.replace(os.path.join(work, "disk.vmdk"), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def empty_hive(path, root_name="ROOT"):
    """Write an empty registry hive (root key only) to `path`."""
    name = root_name.encode("ascii")
    # Root key cell ("nk"): flags 0x2c = HIVE_ENTRY | NO_DELETE | COMP_NAME.
    nk = struct.pack("<2sHQIIIIIIIIIIIIIIIHH", b"nk", 0x2c, 0, 0, 0, 0, 0,
                     0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0, 0xFFFFFFFF,
                     0, 0, 0, 0, 0, len(name), 0) + name
    # Security cell ("sk"): a self-relative descriptor with no owner and a NULL DACL.
    descriptor = struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 0)
    nk_off = 0x20  # cells start after the 32-byte bin header; offsets are bin-relative
    nk_cell = _cell(nk)
    sk_off = nk_off + len(nk_cell)
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_off, sk_off, 1, len(descriptor)) + descriptor
    sk_cell = _cell(sk)
    # Patch the root key's security offset (field at nk+44 bytes, +4 for the cell size).
    nk_cell = nk_cell[:4 + 44] + struct.pack("<I", sk_off) + nk_cell[4 + 48:]
    used = nk_off + len(nk_cell) + len(sk_cell)
    free = struct.pack("<i", 0x1000 - used) + b"\0" * (0x1000 - used - 4)
    hbin = struct.pack("<4sIIQQI", b"hbin", 0, 0x1000, 0, 0, 0) + nk_cell + sk_cell + free
    header = struct.pack("<4sIIQIIIIII", b"regf", 1, 1, 0, 1, 3, 0, 1, nk_off, 0x1000)
    header += struct.pack("<I", 1)  # clustering factor
    header = header.ljust(508, b"\0")
    checksum = 0
    for (word,) in struct.iter_unpack("<I", header[:508]):
        checksum ^= word
    header = (header + struct.pack("<I", checksum)).ljust(0x1000, b"\0")
    with open(path, "wb") as f:
        f.write(header + hbin)
    return path


def _cell(payload):
    """A used cell: negative size (8-byte aligned, size field included), then the payload."""
    size = (len(payload) + 4 + 7) // 8 * 8
    return struct.pack("<i", -size) + payload.ljust(size - 4, b"\0")


def hive(path, keys):
    """A hive holding `keys`: {r"\\Key\\Sub": {name: str | int (dword)}}, written by hivexsh."""
    empty_hive(path)
    script, made = [], set()
    for key, values in keys.items():
        script.append("cd \\")
        parts = [p for p in key.split("\\") if p]
        for depth, part in enumerate(parts, 1):
            if tuple(parts[:depth]) not in made:  # hivex refuses to add a key twice
                made.add(tuple(parts[:depth]))
                script.append(f"add {part}")
            script.append(f"cd {part}")
        if values:
            script.append(f"setval {len(values)}")
            for name, value in values.items():
                script.append(name)
                script.append(f"dword:0x{value:08x}" if isinstance(value, int) else f"string:{value}")
    script.append("commit")
    with tempfile.NamedTemporaryFile("w", suffix=".hivexsh") as f:
        f.write("\n".join(script) + "\n")
        f.flush()
        sh("hivexsh", "-w", "-f", f.name, path)
    return path


SOFTWARE_2019 = {
    r"\Microsoft\Windows NT\CurrentVersion": {
        "ProductName": "Windows Server 2019 Datacenter", "EditionID": "ServerDatacenter",
        "InstallationType": "Server", "CurrentVersion": "6.3", "CurrentBuildNumber": "17763",
        "CurrentBuild": "17763", "CurrentMajorVersionNumber": 10, "CurrentMinorVersionNumber": 0,
        "SystemRoot": "C:\\Windows"},
}
SYSTEM_2019 = {
    r"\Select": {"Current": 1, "Default": 1, "LastKnownGood": 1},
    r"\ControlSet001\Services\Tcpip\Parameters": {"Hostname": "WIN-TEST01", "Domain": ""},
    r"\ControlSet001\Control\ComputerName\ComputerName": {"ComputerName": "WIN-TEST01"},
    r"\ControlSet001\Control\Session Manager\Environment": {"PROCESSOR_ARCHITECTURE": "AMD64"},
    r"\ControlSet001\Services\viostor": {"Start": 0, "ImagePath": "System32\\drivers\\viostor.sys"},
}


def windows_tree(root, software=None, system=None, drivers=("viostor.sys", "netkvm.sys"),
                 hibernated=False, boot_files=True, hives=("SOFTWARE", "SYSTEM", "SAM", "SECURITY", "DEFAULT")):
    """A Windows-like tree at `root` (no Windows binaries: just what validators read)."""
    config = os.path.join(root, "Windows", "System32", "config")
    os.makedirs(config, exist_ok=True)
    os.makedirs(os.path.join(root, "Windows", "System32", "drivers"), exist_ok=True)
    for name in hives:
        keys = {"SOFTWARE": software or SOFTWARE_2019, "SYSTEM": system or SYSTEM_2019}.get(name, {})
        hive(os.path.join(config, name), keys)
    for driver in drivers:
        with open(os.path.join(root, "Windows", "System32", "drivers", driver), "wb") as f:
            f.write(b"MZ" + b"\0" * 62)
    if boot_files:
        os.makedirs(os.path.join(root, "Boot"), exist_ok=True)
        with open(os.path.join(root, "bootmgr"), "wb") as f:
            f.write(b"bootmgr stand-in")
        empty_hive(os.path.join(root, "Boot", "BCD"))  # the BCD store is a hive too
    with open(os.path.join(root, "hiberfil.sys"), "wb") as f:
        f.write((b"HIBR" if hibernated else b"\0\0\0\0") + b"\0" * 4092)
    with open(os.path.join(root, "pagefile.sys"), "wb") as f:
        f.write(b"\0" * 4096)
    return root


def make_ntfs(path, tree, size=24 * MiB, label="Windows"):
    """An NTFS filesystem image populated from `tree` (mkntfs, then ntfs-3g)."""
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkntfs", "-q", "-F", "-f", "-L", label, path)
    mnt = tempfile.mkdtemp(prefix="ntfs-")
    try:
        sh("ntfs-3g", path, mnt)
        try:
            sh("cp", "-a", "--no-preserve=ownership", f"{tree}/.", mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        os.rmdir(mnt)
    return path


# -- the reference: libguestfs' virt-inspector -------------------------------------

VIRT_INSPECTOR_FIELDS = ("name", "arch", "distro", "product_name", "product_variant", "major_version",
                         "minor_version", "hostname", "osinfo", "package_format", "package_management",
                         "windows_systemroot", "windows_current_control_set")


def virt_inspector_env():
    """The environment for virt-inspector, or None where it cannot run.

    libguestfs boots a small appliance with qemu; this host has no kernel of
    its own, so supermin is pointed at the cached Debian root's kernel and
    modules (SUPERMIN_KERNEL...), and TCG is forced (KVM cannot boot here).
    """
    if not shutil.which("virt-inspector"):
        return None
    base = os.path.join(CACHE, "guestfs-kernel")
    if not os.path.isdir(base):
        root = debian_tree(tempfile.mkdtemp(dir=CACHE, prefix=".guestfs-kernel-"))
        keep = os.path.join(root, "keep")
        os.makedirs(keep)
        os.rename(os.path.join(root, "boot"), os.path.join(keep, "boot"))
        os.rename(os.path.join(root, "usr", "lib", "modules"), os.path.join(keep, "modules"))
        os.rename(keep, base)
        shutil.rmtree(root)
    version = sorted(os.listdir(os.path.join(base, "modules")))[-1]
    os.makedirs("/lib/modules", exist_ok=True)  # supermin lstat()s it even when SUPERMIN_MODULES is set
    return dict(os.environ, SUPERMIN_KERNEL=os.path.join(base, "boot", f"vmlinuz-{version}"),
                SUPERMIN_MODULES=os.path.join(base, "modules", version), SUPERMIN_KERNEL_VERSION=version,
                LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg",
                LIBGUESTFS_CACHEDIR=os.path.join(CACHE, "guestfs-appliance"))


def virt_inspector(image, fmt):
    """virt-inspector's view of `image` as a dict (None if it cannot run here)."""
    from defusedxml import ElementTree

    env = virt_inspector_env()
    if env is None:
        return None
    os.makedirs(env["LIBGUESTFS_CACHEDIR"], exist_ok=True)
    xml = sh("virt-inspector", "--no-applications", f"--format={fmt}", "-a", image, env=env)
    system = ElementTree.fromstring(xml).find("operatingsystem")
    found = {k: system.findtext(k) for k in VIRT_INSPECTOR_FIELDS if system.find(k) is not None}
    for key in ("major_version", "minor_version"):
        if key in found:
            found[key] = int(found[key])
    found["filesystems"] = sorted((fs.findtext("type"), fs.findtext("label"), fs.findtext("uuid"))
                                  for fs in system.iter("filesystem"))
    return found
