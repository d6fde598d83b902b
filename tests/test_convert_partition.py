"""partition-to-disk, run directly: a filesystem (AMI) image becomes a disk that boots.

Real filesystems, real loop mounts of the result, and a real boot under qemu
(TCG) of a Debian 12 AMI given an external kernel and ramdisk (aki/ari).
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from imaging_elements.convert import bootdisk
from imaging_elements.sdk.journal import Journal
from tests import base, imagebuild
from tests.test_convert import accepts, allocated, hook_env, required_capacity, run_hook, scratch, status

MiB = imagebuild.MiB
HOOK = os.path.join(base.ROOT, "elements", "partition-to-disk", "convert.d", "40-partition-to-disk")
FIXTURES = None
DEBIAN = {}


def setUpModule():
    global FIXTURES
    FIXTURES = tempfile.mkdtemp(prefix="test-convert-partition-")


def tearDownModule():
    shutil.rmtree(FIXTURES, ignore_errors=True)


def debian():
    """A Debian 12 AMI, built once: a filesystem without a kernel, whose fstab names a Xen
    device, and the kernel and ramdisk beside it as files (the aki/ari)."""
    if DEBIAN:
        return DEBIAN
    tree = imagebuild.debian_tree(os.path.join(FIXTURES, "debian"))
    ext = os.path.join(FIXTURES, "external")
    os.makedirs(ext)
    for pattern in ("boot/vmlinuz-*", "boot/initrd.img-*"):
        for path in glob.glob(os.path.join(tree, pattern)):
            shutil.move(path, ext)
    for link in glob.glob(os.path.join(tree, "vmlinuz*")) + glob.glob(os.path.join(tree, "initrd.img*")):
        os.unlink(link)
    with open(os.path.join(tree, "etc", "fstab"), "w") as f:
        f.write("/dev/xvda1 / ext4 defaults 0 1\n")
    DEBIAN["ami"] = imagebuild.make_fs(os.path.join(FIXTURES, "ami.ext4"), tree, size=512 * MiB)
    DEBIAN["kernel"] = glob.glob(os.path.join(ext, "vmlinuz-*"))[0]
    DEBIAN["ramdisk"] = glob.glob(os.path.join(ext, "initrd.img-*"))[0]
    shutil.rmtree(tree)
    return DEBIAN


def debian_boot_files():
    """Only the Debian kernel and initramfs, as files (cheaper than the whole AMI)."""
    if "kernel" in DEBIAN:
        return DEBIAN
    ext = os.path.join(FIXTURES, "boot-files")
    os.makedirs(ext, exist_ok=True)
    imagebuild.sh("tar", "-x", "-f", imagebuild.debian_tarball(), "-C", ext, "--wildcards",
                  "./boot/vmlinuz-*", "./boot/initrd.img-*")
    return {"kernel": glob.glob(os.path.join(ext, "boot", "vmlinuz-*"))[0],
            "ramdisk": glob.glob(os.path.join(ext, "boot", "initrd.img-*"))[0]}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fs_bytes(device, fstype):
    """The size a filesystem's superblock gives itself."""
    if fstype == "xfs":
        out = imagebuild.sh("xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks blocksize", device)
        values = dict(line.split(" = ") for line in out.splitlines())
        return int(values["dblocks"]) * int(values["blocksize"])
    if fstype == "btrfs":
        out = imagebuild.sh("btrfs", "inspect-internal", "dump-super", device)
        return int(next(line.split()[1] for line in out.splitlines() if line.startswith("total_bytes")))
    fields = dict(line.split(":", 1) for line in imagebuild.sh("dumpe2fs", "-h", device).splitlines()
                  if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


class TestGuestPaths(base.TestCase):
    """The helpers that read and write inside the image (no root needed)."""

    def test_symlinks_resolve_inside_the_root(self):
        root = imagebuild.write_tree(self.path("root"), {
            "srv/boot/vmlinuz-1": b"k", "boot": ("symlink", "/srv/boot"),
            "up": ("symlink", "../../../.."), "etc/loop": ("symlink", "/etc/loop")})
        resolve = bootdisk.resolve_in_root
        self.assertEqual(os.path.join(root, "srv/boot/vmlinuz-1"), resolve(root, "/boot/vmlinuz-1"))
        self.assertEqual(os.path.join(root, "etc/passwd"), resolve(root, "/up/etc/passwd"))
        self.assertEqual(os.path.join(root, "etc"), resolve(root, "/../../etc"))
        self.assertEqual(os.path.join(root, "boot"), resolve(root, "/boot", follow_last=False))
        self.assertRaises(bootdisk.BootDiskError, resolve, root, "/etc/loop")

    def test_write_file_replaces_a_symlink_target_inside_the_root(self):
        root = imagebuild.write_tree(self.path("root"), {
            "etc/real": "old\n", "etc/fstab": ("symlink", "/etc/real")})
        bootdisk.write_file(root, "/etc/fstab", data=b"new\n")
        with open(os.path.join(root, "etc", "real")) as f:
            self.assertEqual("new\n", f.read())
        self.assertTrue(os.path.islink(os.path.join(root, "etc", "fstab")))

    def test_fstab(self):
        ids = {"UUID": "1234-abcd", "LABEL": "rootfs", "PARTUUID": "0badcafe-01"}
        for spec in ("UUID=1234-abcd", "LABEL=rootfs", "PARTUUID=0badcafe-01", "/dev/disk/by-uuid/1234-abcd"):
            text = f"# comment\n{spec} / ext4 defaults 0 1\n"
            self.assertEqual((text, None), bootdisk.fix_fstab(text, ids, "ext4"))
        text, change = bootdisk.fix_fstab("/dev/sda1 / ext3 defaults 0 1\n", ids, "ext4")
        self.assertEqual("UUID=1234-abcd\t/\text4\tdefaults\t0\t1\n", text)
        self.assertEqual("root entry /dev/sda1 -> UUID=1234-abcd, root type ext3 -> ext4", change)
        text, change = bootdisk.fix_fstab("proc /proc proc defaults 0 0\n", ids, "xfs")
        self.assertEqual("proc /proc proc defaults 0 0\nUUID=1234-abcd\t/\txfs\tdefaults\t0\t1\n", text)
        self.assertEqual("added root entry UUID=1234-abcd", change)

    def test_newest_kernel_and_its_initramfs(self):
        root = imagebuild.write_tree(self.path("root"), {
            "boot/vmlinuz-5.10.0-9-amd64": b"k", "boot/vmlinuz-5.10.0-10-amd64": b"k",
            "boot/initrd.img-5.10.0-10-amd64": b"i", "boot/vmlinuz-6.1.0-1-amd64.old": b"k",
            "boot/initramfs-5.10.0-9-amd64.img": b"i"})
        self.assertEqual(("/boot/vmlinuz-5.10.0-10-amd64", "/boot/initrd.img-5.10.0-10-amd64"),
                         bootdisk.find_kernel(root))
        # Debian's /vmlinuz link wins over the newest file.
        os.symlink("boot/vmlinuz-5.10.0-9-amd64", os.path.join(root, "vmlinuz"))
        self.assertEqual(("/boot/vmlinuz-5.10.0-9-amd64", "/boot/initramfs-5.10.0-9-amd64.img"),
                         bootdisk.find_kernel(root))


class PartitionCase(base.TestCase):
    needs_root = True

    def partition(self, fstype="ext4", size=32 * MiB, label="rootfs", **tree_options):
        tree = imagebuild.linux_tree(self.path("tree"), **tree_options)
        return imagebuild.make_fs(self.path(f"part.{fstype}"), tree, fstype=fstype, size=size, label=label)

    def convert(self, source, expect=0, name="disk.raw", **extra):
        output = self.path(name)
        code, records, text = run_hook(HOOK, self.tmp, IMG_IMAGE=source, IMG_SOURCE_TYPE="partition",
                                       IMG_DEST_TYPE="raw", IMG_CONVERT_OUTPUT=output, **extra)
        self.assertEqual(expect, code, f"{records} {text}")
        return output, records

    @contextlib.contextmanager
    def mounted(self, disk):
        """The disk's first partition, mounted read-only through a loop offset."""
        part = imagebuild.partitions(disk)[0]
        device = imagebuild.sh("losetup", "--find", "--show", "--read-only", "--offset", part["start"],
                               "--sizelimit", part["size"], disk).strip()
        target = self.path("mnt")
        os.makedirs(target, exist_ok=True)
        try:
            imagebuild.sh("mount", "-o", "ro,nodev,nosuid,noexec", device, target)
            try:
                yield target, device
            finally:
                imagebuild.sh("umount", target)
        finally:
            imagebuild.sh("losetup", "-d", device)

    def boot_config(self, root):
        with open(os.path.join(root, "boot", "extlinux", "extlinux.conf")) as f:
            lines = [line.split(None, 1) for line in f.read().splitlines() if line.strip()]
        return {words[0]: words[1] if len(words) > 1 else "" for words in lines}


class TestDiskLayout(PartitionCase):

    def test_mbr_disk_with_the_filesystem_at_one_mib(self):
        source = self.partition()
        before = sha256(source)
        disk, records = self.convert(source)
        self.assertEqual(before, sha256(source), "the input was modified")
        table = json.loads(imagebuild.sh("sfdisk", "--json", disk))["partitiontable"]
        self.assertEqual("dos", table["label"])
        [part] = table["partitions"]
        self.assertEqual((2048, "83", True), (part["start"], part["type"], part.get("bootable")))
        self.assertEqual(os.path.getsize(disk), (part["start"] + part["size"]) * 512)
        with open(disk, "rb") as f, open(bootdisk.MBR_CODE, "rb") as mbr:
            self.assertEqual(mbr.read(440), f.read(440))
        # Progress covered the copy; the description says what was done.
        progress = status(records, "progress")
        self.assertEqual(progress[-1]["done"], progress[-1]["total"])
        self.assertIn("extlinux boots /boot/vmlinuz-6.1.0-test", status(records, "describe")[0])
        # The copy is sparse: its allocation is close to the filesystem's.
        self.assertLess(allocated(disk), allocated(source) + 2 * MiB)

    def test_boot_config_points_at_files_in_the_filesystem(self):
        disk, _ = self.convert(self.partition())
        with self.mounted(disk) as (root, device):
            conf = self.boot_config(root)
            for key in ("LINUX", "INITRD"):
                self.assertTrue(os.path.isfile(root + conf[key]), f"{key} {conf[key]} is missing")
            self.assertTrue(os.path.isfile(os.path.join(root, "boot", "extlinux", "ldlinux.sys")))
            uuid = imagebuild.sh("blkid", "-p", "-s", "UUID", "-o", "value", device).strip()
            self.assertIn(f"root=UUID={uuid}", conf["APPEND"])
            self.assertIn("console=ttyS0", conf["APPEND"])
            with open(os.path.join(root, "etc", "fstab")) as f:
                self.assertEqual("LABEL=rootfs / ext4 defaults 0 1\n", f.read())

    def test_extra_kernel_arguments(self):
        disk, _ = self.convert(self.partition(), IMG_KERNEL_CMDLINE="net.ifnames=0 quiet")
        with self.mounted(disk) as (root, _):
            self.assertTrue(self.boot_config(root)["APPEND"].endswith("net.ifnames=0 quiet"))

    def test_grows_the_disk_and_the_filesystem(self):
        disk, records = self.convert(self.partition(), IMG_SIZE="96M")
        self.assertEqual(96 * MiB, os.path.getsize(disk))
        part = imagebuild.partitions(disk)[0]
        self.assertEqual(95 * MiB, part["size"])
        with self.mounted(disk) as (_, device):
            self.assertEqual(part["size"], fs_bytes(device, "ext4"))
        self.assertIn("grown from", status(records, "describe")[0])
        self.assertLess(allocated(disk), 40 * MiB)

    def test_a_size_below_the_filesystem_is_refused(self):
        disk, records = self.convert(self.partition(), expect=1, IMG_SIZE="16M")
        self.assertIn("is smaller than the filesystem", status(records, "fail")[0])
        self.assertFalse(os.path.exists(disk))

    def test_required_capacity_covers_what_is_written(self):
        source = self.partition()
        need = required_capacity(HOOK, self.tmp, IMG_IMAGE=source, IMG_SOURCE_TYPE="partition",
                                 IMG_DEST_TYPE="raw", IMG_SIZE="96M")
        disk, _ = self.convert(source, IMG_SIZE="96M")
        self.assertGreaterEqual(need, allocated(disk))
        self.assertLess(need, 96 * MiB)


class TestRootAndKernel(PartitionCase):

    def test_device_name_root_becomes_uuid(self):
        """An AMI's fstab names a Xen device; without an initramfs the kernel finds the
        root by the MBR partition id."""
        source = self.partition(fstab="/dev/xvda1\t/\text3\tdefaults\t0 1\nproc /proc proc defaults 0 0\n")
        os.unlink(self.path("tree", "boot", "initrd.img-6.1.0-test"))
        source = imagebuild.make_fs(source, self.path("tree"), size=32 * MiB, label="rootfs")
        disk, records = self.convert(source)
        disk_id = json.loads(imagebuild.sh("sfdisk", "--json", disk))["partitiontable"]["id"][2:]
        with self.mounted(disk) as (root, device):
            uuid = imagebuild.sh("blkid", "-p", "-s", "UUID", "-o", "value", device).strip()
            with open(os.path.join(root, "etc", "fstab")) as f:
                fstab = f.read().splitlines()
            conf = self.boot_config(root)
        self.assertEqual(f"UUID={uuid}\t/\text4\tdefaults\t0\t1", fstab[0])
        self.assertEqual("proc /proc proc defaults 0 0", fstab[1])
        self.assertNotIn("INITRD", conf)
        self.assertIn(f"root=PARTUUID={disk_id}-01 rootfstype=ext4", conf["APPEND"])
        self.assertIn("root entry /dev/xvda1 -> UUID=", status(records, "describe")[0])

    def test_external_kernel_and_ramdisk_go_to_boot(self):
        files = debian_boot_files()
        tree = self.path("tree")
        imagebuild.write_tree(tree, {"etc/fstab": "/dev/xvda1 / ext4 defaults 0 1\n",
                                     "etc/hostname": "ami\n"})
        source = imagebuild.make_fs(self.path("ami.ext4"), tree, size=64 * MiB)
        disk, records = self.convert(source, IMG_KERNEL=files["kernel"], IMG_RAMDISK=files["ramdisk"])
        with self.mounted(disk) as (root, device):
            conf = self.boot_config(root)
            self.assertEqual(bootdisk.EXTERNAL_KERNEL, conf["LINUX"])
            self.assertEqual(bootdisk.EXTERNAL_RAMDISK, conf["INITRD"])
            self.assertEqual(sha256(files["kernel"]), sha256(root + conf["LINUX"]))
            self.assertEqual(sha256(files["ramdisk"]), sha256(root + conf["INITRD"]))
        self.assertIn(f"placed {files['kernel']} at /boot/vmlinuz-external", status(records, "describe")[0])

    def test_an_external_kernel_must_be_a_bzimage(self):
        kernel = self.path("aki")
        with open(kernel, "wb") as f:
            f.write(b"\x7fELF" + bytes(4096))
        disk, records = self.convert(self.partition(), expect=1, IMG_KERNEL=kernel)
        self.assertIn(f"IMG_KERNEL={kernel}: not an x86 bzImage", status(records, "fail")[0])
        self.assertFalse(os.path.exists(disk))

    def test_no_kernel_anywhere_makes_a_plain_disk_with_a_warning(self):
        tree = imagebuild.write_tree(self.path("tree"), {"etc/fstab": "LABEL=data / ext4 defaults 0 1\n"})
        disk, records = self.convert(imagebuild.make_fs(self.path("data.ext4"), tree, label="data"))
        self.assertIn("the disk will not boot", status(records, "warn")[0])
        with self.mounted(disk) as (root, _):
            self.assertFalse(os.path.exists(os.path.join(root, "boot", "extlinux")))

    def test_symlinks_in_the_image_never_reach_the_host(self):
        """/boot is an absolute symlink to a path that also exists on the host."""
        host_dir = self.path("hostdir")
        os.makedirs(host_dir)
        inside = host_dir.lstrip("/")
        tree = imagebuild.linux_tree(self.path("tree"), extra={
            f"{inside}/vmlinuz-5.10.0-evil": b"kernel", f"{inside}/initrd.img-5.10.0-evil": b"initrd"})
        shutil.rmtree(os.path.join(tree, "boot"))
        os.symlink(host_dir, os.path.join(tree, "boot"))
        os.unlink(os.path.join(tree, "etc", "fstab"))
        os.symlink("/etc/../../../../etc/fstab.real", os.path.join(tree, "etc", "fstab"))
        disk, _ = self.convert(imagebuild.make_fs(self.path("evil.ext4"), tree, size=32 * MiB, label="rootfs"))
        self.assertEqual([], os.listdir(host_dir))
        with self.mounted(disk) as (root, _):
            with open(os.path.join(root, inside, "extlinux", "extlinux.conf")) as f:
                text = f.read()
            self.assertIn(f"LINUX /{inside}/vmlinuz-5.10.0-evil", text)
            with open(os.path.join(root, "etc", "fstab.real")) as f:
                self.assertIn(" / ext4", f.read().replace("\t", " "))


class TestFilesystems(PartitionCase):

    def test_xfs_and_btrfs(self):
        for fstype, size in (("xfs", 300 * MiB), ("btrfs", 128 * MiB)):
            source = self.partition(fstype, size=size, fstab=f"LABEL=rootfs / {fstype} defaults 0 1\n")
            disk, records = self.convert(source, name=f"{fstype}.raw", IMG_SIZE=str(size + 256 * MiB))
            with self.mounted(disk) as (root, device):
                conf = self.boot_config(root)
                self.assertTrue(os.path.isfile(root + conf["LINUX"]))
                # (on btrfs ldlinux.sys lives in the boot area, not in a file)
                self.assertTrue(os.path.isfile(os.path.join(root, "boot", "extlinux", "ldlinux.c32")))
                self.assertGreater(fs_bytes(device, fstype), size, f"{fstype} was not grown")
            shutil.rmtree(self.path("tree"))
            os.unlink(disk)

    def test_declines_filesystems_extlinux_cannot_boot(self):
        vfat = self.path("part.vfat")
        with open(vfat, "wb") as f:
            f.truncate(32 * MiB)
        imagebuild.sh("mkfs.vfat", "-F", "32", vfat)
        squash = self.path("part.squashfs")
        imagebuild.sh("mksquashfs", imagebuild.linux_tree(self.path("tree")), squash, "-quiet", "-noappend")
        for source, name in ((vfat, "vfat"), (squash, "squashfs")):
            accepted, reason = accepts(HOOK, self.tmp, IMG_IMAGE=source, IMG_SOURCE_TYPE="partition",
                                       IMG_DEST_TYPE="raw")
            self.assertFalse(accepted)
            self.assertIn(f"holds a {name} filesystem", reason)
            disk, records = self.convert(source, expect=1)
            self.assertIn(source, status(records, "bad-input")[0])
            self.assertFalse(os.path.exists(disk))

    def test_a_filesystem_the_kernel_cannot_mount(self):
        """The copy fails to mount: the error names the input, and nothing is left."""
        source = self.partition()
        with open(source, "r+b") as f:
            f.seek(1024 + 24)   # s_log_block_size: a 2^40 KiB block is no filesystem
            f.write((30).to_bytes(4, "little"))
        disk, records = self.convert(source, expect=1)
        self.assertIn(source, status(records, "bad-input")[0])
        self.assertFalse(os.path.exists(disk))
        self.assertEqual([], os.listdir(scratch(self.tmp)))


class TestInterrupt(PartitionCase):

    def test_sigterm_removes_the_partial_disk(self):
        output = self.path("disk.raw")
        env = hook_env(HOOK, self.tmp, IMG_IMAGE=debian()["ami"], IMG_SOURCE_TYPE="partition",
                       IMG_DEST_TYPE="raw", IMG_CONVERT_OUTPUT=output)
        # The hook's own process alone is signalled: its SIGTERM handling removes the partial disk.
        process = subprocess.Popen([HOOK, "run"], env=env, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:   # the copy is under way
            if '"progress"' in line and '"done": 0,' not in line:
                break
        process.send_signal(signal.SIGTERM)
        process.stderr.read()
        self.assertEqual(143, process.wait(timeout=60))
        self.assertFalse(os.path.exists(output))
        self.assertEqual([], Journal(env["IMG_JOURNAL"]).pending())


def boot(disk, wanted, timeout=300):
    """Boot `disk` under qemu (TCG, serial console to a file) until `wanted` appears."""
    console = disk + ".console"
    process = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-display", "none", "-no-reboot",
         "-nic", "none", "-drive", f"file={disk},if=virtio,format=raw,snapshot=on",
         "-serial", f"file:{console}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            if not os.path.exists(console):  # qemu not that far yet (a loaded machine)
                continue
            with open(console, "rb") as f:
                text = f.read().decode(errors="replace")
            if wanted in text:
                return text
        raise AssertionError(f"{disk} did not reach {wanted!r} in {timeout} s; console ends:\n"
                             + (open(console, errors="replace").read()[-3000:]
                                if os.path.exists(console) else "(no console output)"))
    finally:
        process.kill()
        process.wait()


class TestBoots(PartitionCase):
    """The disk boots under qemu (the instance validators check much more, see
    docs/instance-validators.md): one boot, of the hardest case."""

    def test_ami_with_external_kernel_and_ramdisk(self):
        """extlinux loads the external kernel and ramdisk, the initramfs finds the root by
        UUID, and systemd remounts it from the rewritten fstab."""
        files = debian()
        disk, _ = self.convert(files["ami"], IMG_KERNEL=files["kernel"], IMG_RAMDISK=files["ramdisk"],
                               IMG_SIZE="768M")
        console = boot(disk, "EXT4-fs (vda1): re-mounted")
        self.assertIn("SYSLINUX", console)
        self.assertIn("BOOT_IMAGE=/boot/vmlinuz-external root=UUID=", console)
        self.assertRegex(console, r"EXT4-fs \(vda1\): mounted filesystem")
