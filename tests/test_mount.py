"""The mounters on real images, mounted for real (root): raw MBR and GPT disks,
partition images, every container format, NTFS and FAT, and bad input.

Each test runs the stock mounters' mount.d hooks as the runner does
(tests.test_mount_support.MountRun), looks at the mounted tree, then unwinds
the journal; base.LeakCheck fails a test that leaves a loop device, a mount or
a daemon behind.  End-to-end runs through euca-image-process are in
test_mount_e2e.py, fault injection in test_mount_faults.py.
"""

import os
import random
import shutil
import struct

from imaging_elements.engine import hooks, imagetype
from imaging_elements.mount import disk
from tests import base, imagebuild
from tests.imagebuild import MiB, sh
from tests.test_mount_support import (BOOT_UUID, ESP_PARTUUID, KERNEL, MOUNTERS, XFS_UUID, MountRun,
                                      copy, image)


class MountTestCase(base.TestCase):
    needs_root = True

    def mount(self, path, disk_type=None, elements=MOUNTERS, env=None, expect_ok=True):
        disk_type = disk_type or imagetype.detect(path)
        work = self.path(f"work-{len(os.listdir(self.tmp))}")
        run = MountRun(work, path, disk_type, elements, env)
        self.addCleanup(self._unwind, run)
        ok = run.run()
        if expect_ok and not ok:
            self.fail(f"mount failed in {run.failed_hook}: {run.failure}\n{run.log}")
        if expect_ok is False and ok:
            self.fail(f"mount of {path} succeeded, expected a failure; {run.describes}")
        return run

    def _unwind(self, run):
        failures = run.unwind()
        self.assertEqual([], failures)

    def assertReadOnlySafe(self, options):
        self.assertTrue({"ro", "nodev", "nosuid"} <= options, options)

    def assertLinuxRoot(self, run):
        mnt = run.mount_point
        self.assertEqual("linux", run.env["IMG_PLATFORM"])
        with open(os.path.join(mnt, "etc/hostname")) as f:
            self.assertEqual("testguest\n", f.read())
        for point, (_, _, options) in run.mounts().items():
            self.assertReadOnlySafe(options)


class RawDiskTest(MountTestCase):

    def test_mbr_root_and_separate_boot(self):
        run = self.mount(image("linux-dos"))
        self.assertLinuxRoot(run)
        mounts = run.mounts()
        self.assertEqual({"/", "/boot"}, set(mounts))
        self.assertEqual("ext4", mounts["/boot"][1])
        # /boot is the other partition, found by UUID= in the guest's fstab.
        self.assertTrue(os.path.isfile(os.path.join(run.mount_point, "boot/from-boot-partition")))
        self.assertTrue(os.path.isfile(os.path.join(run.mount_point, f"boot/vmlinuz-{KERNEL}")))
        boot, root = run.filesystems()
        self.assertEqual({"index": 1, "start": MiB, "size": 16 * MiB, "fstype": "ext4",
                          "uuid": BOOT_UUID, "label": "boot", "partlabel": None,
                          "mountpoint": "/boot", "root": False},
                         {k: boot[k] for k in ("index", "start", "size", "fstype", "uuid", "label",
                                               "partlabel", "mountpoint", "root")})
        self.assertEqual(("/", True, "rootfs", "ext4"),
                         (root["mountpoint"], root["root"], root["label"], root["fstype"]))
        # dos PARTUUIDs are the disk signature and the partition number, as the kernel names them.
        self.assertRegex(root["partuuid"], r"^[0-9a-f]{8}-02$")
        self.assertEqual(root["partuuid"][:8], boot["partuuid"][:8])
        # Never a journal replay on a read-only mount.
        self.assertIn("norecovery", mounts["/"][2])

    def test_gpt_xfs_root_with_esp_and_btrfs_var(self):
        run = self.mount(image("linux-gpt"))
        self.assertLinuxRoot(run)
        mounts = run.mounts()
        self.assertEqual({"/", "/boot/efi", "/var"}, set(mounts))
        self.assertEqual("xfs", mounts["/"][1])
        self.assertEqual("btrfs", mounts["/var"][1])
        mnt = run.mount_point
        with open(os.path.join(mnt, "boot/efi/EFI/debian/grubx64.efi"), "rb") as f:
            self.assertEqual(b"MZ grub stand-in", f.read())
        self.assertTrue(os.path.isfile(os.path.join(mnt, "boot/efi/EFI/BOOT/BOOTX64.EFI")))
        self.assertTrue(os.path.isfile(os.path.join(mnt, "var/log/from-var-partition")))
        esp, root, var = run.filesystems()
        self.assertEqual(("vfat", ESP_PARTUUID, "EFI system", "/boot/efi"),
                         (esp["fstype"], esp["partuuid"], esp["partlabel"], esp["mountpoint"]))
        self.assertEqual((XFS_UUID, True), (root["uuid"], root["root"]))
        self.assertEqual(("var", "/var"), (var["partlabel"], var["mountpoint"]))

    def test_writable_mount_writes_the_image(self):
        path = copy("linux-dos", self.tmp)
        run = self.mount(path, env={"IMG_MOUNT_WRITABLE": "1"})
        mounts = run.mounts()
        for point in ("/", "/boot"):
            self.assertIn("rw", mounts[point][2])
            self.assertTrue({"nodev", "nosuid"} <= mounts[point][2])
        with open(os.path.join(run.mount_point, "etc/written-by-test"), "w") as f:
            f.write("hello\n")
        self.assertEqual([], run.unwind())
        again = self.mount(path)
        with open(os.path.join(again.mount_point, "etc/written-by-test")) as f:
            self.assertEqual("hello\n", f.read())

    def test_writable_qcow2(self):
        path = copy("qcow2", self.tmp)
        run = self.mount(path, env={"IMG_MOUNT_WRITABLE": "1", "IMG_INPUT": path})
        self.assertIn(f"{path}: mounted writable: changes are written into this input file itself",
                      run.warnings)
        with open(os.path.join(run.mount_point, "boot/written-by-test"), "w") as f:
            f.write("hello\n")
        self.assertEqual([], run.unwind())
        again = self.mount(path)
        with open(os.path.join(again.mount_point, "boot/written-by-test")) as f:
            self.assertEqual("hello\n", f.read())

    def test_vhdx_with_a_log_to_replay(self):
        """Mounted from a replayed copy in the scratch space; the input is unchanged;
        writable, refused (the changes would go to the copy)."""
        path = imagebuild.dirty_vhdx(image("linux-dos"), self.path("dirty.vhdx"))
        if path is None:
            self.skipTest("qemu-io could not be stopped with the VHDX log dirty here")
        with open(path, "rb") as f:
            before = f.read()
        run = self.mount(path, "vhdx")
        self.assertLinuxRoot(run)
        self.assertIn(f"{path}: the vhdx log was replayed on a copy in the scratch directory "
                      "(an unclean shutdown); the input is unchanged", run.warnings)
        self.assertEqual([], run.unwind())
        run = self.mount(path, "vhdx", env={"IMG_MOUNT_WRITABLE": "1"}, expect_ok=False)
        self.assertIn(f"{path}: the vhdx image has a log that needs to be replayed", run.failure)
        self.assertIn("mount it read-only or convert it first", run.failure)
        self.assertNotIn("qemu-img check -r", run.failure)  # never advice that changes the file
        with open(path, "rb") as f:
            self.assertEqual(before, f.read(), "the user's file was changed")

    def test_writable_stream_optimized_vmdk_is_refused(self):
        path = copy("vmdk-stream", self.tmp)
        run = self.mount(path, env={"IMG_MOUNT_WRITABLE": "1"}, expect_ok=False)
        self.assertIn(f"{path}: a streamOptimized VMDK cannot be written in place", run.failure)

    def test_fstab_dev_names_resolve_against_the_image(self):
        path = copy("linux-dos", self.tmp)
        self._rewrite_fstab(path, "/dev/sda2 / ext4 defaults 0 1\n/dev/vda1 /boot ext4 defaults 0 2\n"
                                  "UUID=deadbeef-0000-4000-8000-000000000000 /data ext4 defaults 0 2\n"
                                  "/dev/sdb1 /srv ext4 defaults 0 2\n/dev/sda1 relative/boot ext4 defaults 0 2\n")
        run = self.mount(path)
        self.assertEqual({"/", "/boot"}, set(run.mounts()))
        warnings = "\n".join(run.warnings)
        self.assertIn("fstab entry for /data: UUID=deadbeef-0000-4000-8000-000000000000 matches no "
                      "filesystem of this image", warnings)
        self.assertIn("fstab entry for /srv: /dev/sdb1 is on a disk other than the first; this image is "
                      "one disk; not mounted", warnings)
        self.assertIn("fstab line 5 (/dev/sda1 on relative/boot): the mount point is not an absolute path; "
                      "not mounted", warnings)

    def test_fstab_mount_point_symlink_stays_in_the_image(self):
        # A hostile guest: /boot is a symlink climbing out towards a host directory.
        host_dir = self.path("host-dir")
        os.makedirs(host_dir)
        path = copy("linux-dos", self.tmp)
        self._edit_root(path, lambda root: (
            os.rmdir(os.path.join(root, "boot")),
            os.symlink("../" * 30 + host_dir.lstrip("/"), os.path.join(root, "boot"))))
        run = self.mount(path)
        self.assertEqual({"/"}, set(run.mounts()))
        self.assertFalse(os.path.ismount(host_dir))
        self.assertEqual([], os.listdir(host_dir))
        self.assertIn("cannot mount partition 1 (ext4, LABEL=boot) at /boot", "\n".join(run.warnings))

    def _edit_root(self, path, edit):
        """Change the root filesystem (partition 2) of a copy of linux-dos, offline."""
        start = MiB + 16 * MiB
        device = sh("losetup", "--find", "--show", "--offset", start, "--sizelimit", 32 * MiB, path).strip()
        try:
            mnt = self.path("edit")
            os.makedirs(mnt, exist_ok=True)
            sh("mount", device, mnt)
            try:
                edit(mnt)
            finally:
                sh("umount", mnt)
        finally:
            sh("losetup", "-d", device)

    def _rewrite_fstab(self, path, text):
        def edit(root):
            with open(os.path.join(root, "etc/fstab"), "w") as f:
                f.write(text)
        self._edit_root(path, edit)


class PartitionImageTest(MountTestCase):

    def test_ami_ext4(self):
        run = self.mount(image("ami-ext4"))
        self.assertEqual("partition", run.env["IMG_DISK_TYPE"])
        self.assertLinuxRoot(run)
        self.assertEqual({"/"}, set(run.mounts()))
        [fs] = run.filesystems()
        self.assertEqual((0, 0, "ext4", "cloudimg-rootfs", "/", True),
                         (fs["index"], fs["start"], fs["fstype"], fs["label"], fs["mountpoint"], fs["root"]))
        # /dev/xvdb is the instance's ephemeral disk, not part of this image.
        self.assertIn("fstab entry for /mnt: /dev/xvdb is on a disk other than the first", "\n".join(run.warnings))

    def test_xfs(self):
        run = self.mount(image("xfs-partition"))
        self.assertLinuxRoot(run)
        self.assertEqual("xfs", run.mounts()["/"][1])

    def test_btrfs_root_in_a_subvolume(self):
        run = self.mount(image("btrfs-subvolume"))
        self.assertLinuxRoot(run)
        source, fstype, options = run.mounts()["/"]
        self.assertEqual("btrfs", fstype)
        self.assertIn("subvol=/@", options)
        self.assertEqual("@", run.filesystems()[0]["subvol"])


class ContainerTest(MountTestCase):
    """Every container format, through the qemu-storage-daemon FUSE export."""

    def check_container(self, name, fmt):
        path = image(name)
        run = self.mount(path, fmt)
        self.assertIn("10-qemu-fuse-export", run.ran)
        self.assertEqual("raw", run.env["IMG_DISK_TYPE"])
        export = run.env["IMG_DISK"]
        self.assertTrue(os.path.ismount(export))
        # VHD rounds the size up to a whole CHS geometry.
        self.assertLessEqual(os.path.getsize(image("linux-dos")), os.path.getsize(export))
        self.assertLess(os.path.getsize(export), os.path.getsize(image("linux-dos")) + MiB)
        with self.assertRaises(OSError):  # a read-only view
            with open(export, "r+b") as f:
                f.write(b"x")
        self.assertLinuxRoot(run)
        self.assertEqual({"/", "/boot"}, set(run.mounts()))
        self.assertTrue(os.path.isfile(os.path.join(run.mount_point, "boot/from-boot-partition")))

    def test_vmdk_stream_optimized(self):
        self.check_container("vmdk-stream", "vmdk")

    def test_vmdk_monolithic_sparse(self):
        self.check_container("vmdk-sparse", "vmdk")

    def test_qcow2(self):
        self.check_container("qcow2", "qcow2")

    def test_vhd_dynamic(self):
        self.check_container("vhd", "vhd")

    def test_vhd_fixed(self):
        self.check_container("vhd-fixed", "vhd")

    def test_vhdx(self):
        self.check_container("vhdx", "vhdx")

    def test_qcow2_holding_a_partition_image(self):
        run = self.mount(image("ami-qcow2"), "qcow2")
        self.assertEqual("partition", run.env["IMG_DISK_TYPE"])
        self.assertIn("20-mount-partition", run.ran)
        self.assertLinuxRoot(run)


class WindowsTest(MountTestCase):

    def test_ntfs_windows_root(self):
        run = self.mount(image("windows"))
        self.assertEqual("windows", run.env["IMG_PLATFORM"])
        source, fstype, options = run.mounts()["/"]
        self.assertEqual("fuseblk", fstype)
        self.assertReadOnlySafe(options)
        self.assertTrue(os.path.isdir(os.path.join(run.mount_point, "Windows/System32/config")))
        reserved, windows = run.filesystems()
        self.assertEqual(("ntfs", "System Reserved", None, False),
                         (reserved["fstype"], reserved["label"], reserved["mountpoint"], reserved["root"]))
        self.assertEqual(("/", True), (windows["mountpoint"], windows["root"]))

    def test_without_the_ntfs_mounter_says_which_element_is_missing(self):
        run = self.mount(image("windows"), elements=("mount-common", "mount-disk"), expect_ok=False)
        self.assertEqual("90-mount-check", run.failed_hook)
        self.assertIn("no recognisable root", run.failure)
        self.assertIn("partition 2 (ntfs, LABEL=Windows): not tried: add the mount-ntfs element", run.failure)


class BadInputTest(MountTestCase):
    """A clear error naming the file and the reason; nothing left behind (LeakCheck)."""

    def assertFails(self, path, disk_type, *expected, elements=MOUNTERS):
        run = self.mount(path, disk_type, elements, expect_ok=False)
        self.assertIn(path, run.failure)
        for text in expected:
            self.assertIn(text, run.failure)
        self.assertEqual([], run.unwind())
        self.assertEqual({}, run.mounts())
        return run

    def test_truncated_disk(self):
        path = copy("linux-dos", self.tmp)
        os.truncate(path, 30 * MiB)
        self.assertFails(path, "raw", "partition 2 ends at byte 51380224, past the end of the disk "
                                      "(31457280 bytes)")

    def test_overlapping_partitions(self):
        path = copy("linux-dos", self.tmp)
        with open(path, "r+b") as f:  # partition 2 now starts inside partition 1
            f.seek(446 + 16 + 8)
            f.write(struct.pack("<I", 2048 + 100))
        self.assertFails(path, "raw", "partitions 1 and 2 overlap", "corrupt partition table")

    def test_corrupt_gpt_headers(self):
        path = copy("linux-gpt", self.tmp)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # both GPT headers gone: only the protective MBR is left
            f.seek(512)
            f.write(b"\0" * 512)
            f.seek(size - 512)
            f.write(b"\0" * 512)
        self.assertFails(path, "raw", "no recognisable root", "partition 1 (no filesystem)")

    def test_no_partition_table(self):
        path = self.path("random.img")
        with open(path, "wb") as f:
            f.write(random.Random(3).randbytes(4 * MiB))
        self.assertEqual("unknown", imagetype.detect(path))
        self.assertFails(path, "raw", "cannot read the partition table", "does not contain a recognized "
                                                                         "partition table")

    def test_partition_image_without_a_filesystem(self):
        path = self.path("zeros.img")
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
        self.assertFails(path, "partition", "no filesystem found in this partition image")

    def test_no_root(self):
        self.assertFails(image("no-root"), "raw", "no recognisable root",
                         "partition 1 (ext4, LABEL=data): no /etc/fstab with an init, nor a Windows directory")

    def test_fstab_but_no_init(self):
        self.assertFails(image("no-init"), "raw", "has /etc/fstab but no init")

    def test_cross_linked_fat_is_capped_in_total(self):
        # 41 directory entries share one 14 MiB chain: 600 MB to copy from a 16 MiB FAT.
        path = image("fat-bomb")
        run = self.mount(path, "raw", expect_ok=False)
        limit = disk.fat_copy_limit(16 * MiB, 1 << 62)
        self.assertIn(f"partition 1 (vfat, LABEL=EFI): its files add up to more than {limit} bytes "
                      f"(the cap for a {16 * MiB}-byte FAT): cross-linked or looping directory entries",
                      run.failure)
        scratch = run.env["IMG_SCRATCH_DIR"]
        # The copy is on a filesystem in a file of the scratch space: that file is all it took.
        stores = [os.path.join(scratch, n) for n in os.listdir(scratch) if n.endswith(".ext4")]
        self.assertEqual(1, len(stores))
        self.assertLessEqual(os.stat(stores[0]).st_blocks * 512, limit)
        self.assertEqual([], run.unwind())
        self.assertEqual([], os.listdir(scratch))

    def test_fat_copy_limit(self):
        self.assertEqual(2 * 100 * MiB + 16 * MiB, disk.fat_copy_limit(100 * MiB, 1 << 40))
        self.assertEqual(50 * MiB, disk.fat_copy_limit(100 * MiB, 50 * MiB))

    def test_lvm_is_reported_as_unsupported(self):
        if not shutil.which("pvcreate"):
            self.skipTest("pvcreate (lvm2) is not installed: cannot build the LVM test image")
        self.assertFails(image("lvm"), "raw", "partition 2 (LVM2_member): an LVM physical volume: "
                                              "LVM inside images is not supported")

    def test_truncated_qcow2(self):
        path = copy("qcow2", self.tmp)
        os.truncate(path, os.path.getsize(path) // 2)
        # It would open, and read zeros where its clusters were: qemu-img check catches it.
        self.assertFails(path, "qcow2", "the qcow2 image is corrupt or truncated (qemu-img check)")

    def test_truncated_vmdk(self):
        path = copy("vmdk-stream", self.tmp)
        os.truncate(path, os.path.getsize(path) // 2)
        self.assertFails(path, "vmdk", "qemu rejects it as vmdk (qemu-img check)", "points after EOF")

    def test_fuzzed_vmdks(self):
        """Byte flips in the header (qemu rejects those) and in the compressed
        grains (qemu opens it, reads fail or return junk): a clear error naming
        the file or a mount, never a crash, a hang or a leak."""
        original = image("vmdk-stream")
        with open(original, "rb") as f:
            pristine = f.read()
        outcomes = []
        for seed in range(9):
            path = self.path(f"fuzz-{seed}.vmdk")
            data = bytearray(pristine)
            rng = random.Random(seed)
            # Seeds 0-5: header fields (magic kept); 6-8: the grains after the header.
            low, high = (4, 80) if seed < 6 else (65536, len(data) - 1024)
            for _ in range(8 if seed < 6 else 64):
                data[rng.randrange(low, high)] = rng.randrange(256)
            with open(path, "wb") as f:
                f.write(data)
            run = self.mount(path, "vmdk", expect_ok=None)
            if run.failure:
                self.assertIn(path, run.failure)
                self.assertNotIn("Traceback", run.failure)
            outcomes.append(run.failure is None)
            self.assertEqual([], run.unwind())
            self.assertEqual({}, run.mounts())
        self.assertFalse(any(outcomes[:6]), "qemu accepted a damaged header")

    def test_vmdk_monolithic_flat_is_refused(self):
        """A descriptor names another file (its flat extent): refused, saying that
        the flat extent is the raw disk to give instead."""
        self.assertFails(image("vmdk-flat"), "vmdk", "names the file 'linux-dos-flat.vmdk'",
                         "give its flat extent file as a raw image instead")

    def test_vmdk_descriptor_extent_outside_the_image(self):
        directory = self.path("flat")
        os.makedirs(directory)
        descriptor = os.path.join(directory, "evil.vmdk")
        with open(image("vmdk-flat"), errors="replace") as f:
            text = f.read().split("\0")[0]
        for extent in ("/etc/passwd", "../outside-flat.vmdk"):
            with open(descriptor, "w") as f:
                f.write(text.replace('"linux-dos-flat.vmdk"', f'"{extent}"'))
            self.assertFails(descriptor, "vmdk", f"names the file {extent!r}; refusing")
        with open(descriptor, "w") as f:  # no network in the sandbox either
            f.write(text.replace('"linux-dos-flat.vmdk"', '"nbd:localhost:10809"'))
        self.assertFails(descriptor, "vmdk", "names the file 'nbd:localhost:10809'; refusing")
        os.symlink("/etc/passwd", os.path.join(directory, "link-flat.vmdk"))
        with open(descriptor, "w") as f:
            f.write(text.replace('"linux-dos-flat.vmdk"', '"link-flat.vmdk"'))
        self.assertFails(descriptor, "vmdk", "names the file 'link-flat.vmdk'; refusing")

    def test_qcow2_with_a_backing_file_is_refused(self):
        path = self.path("child.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", path)
        self.assertFails(path, "qcow2", "has a backing file (a differencing disk): '/etc/passwd'")

    def test_declared_type_must_match_the_content(self):
        with self.assertRaises(imagetype.ImageTypeError) as caught:
            imagetype.resolve(image("qcow2"), "vmdk")
        self.assertIn("declared as vmdk but the content is qcow2", str(caught.exception))
        self.assertEqual("raw", imagetype.resolve(image("linux-dos")))
        self.assertEqual("partition", imagetype.resolve(image("ami-ext4"), "raw"))


class AcceptsTest(base.TestCase):
    """accepts(disk type) is false, with a reason, when a needed tool is missing."""

    def hook(self, element, name):
        path = os.path.join(base.ROOT, "elements", element, "mount.d", name)
        return hooks.Hook("mount", name, path, element)

    def test_missing_tools(self):
        empty = self.path("empty-bin")
        os.makedirs(empty)
        for element, name, tool, disk_type in (
                ("mount-qemu-fuse", "10-qemu-fuse-export", "qemu-storage-daemon", "vmdk"),
                ("mount-ntfs", "30-mount-ntfs", "ntfs-3g", "raw"),
                ("mount-fat", "30-mount-fat", "mcopy", "raw"),
                ("mount-disk", "20-mount-disk", "losetup", "raw")):
            ok, reason = hooks.static_accepts(self.hook(element, name), {"disk-type": disk_type}, empty)
            self.assertEqual((False, f"needs {tool}, not found on PATH"), (ok, reason))

    def test_disk_types(self):
        fuse = self.hook("mount-qemu-fuse", "10-qemu-fuse-export")
        for fmt in ("vmdk", "qcow2", "vhd", "vhdx"):
            self.assertTrue(hooks.static_accepts(fuse, {"disk-type": fmt}, os.environ["PATH"])[0])
        ok, reason = hooks.static_accepts(fuse, {"disk-type": "raw"}, os.environ["PATH"])
        self.assertEqual((False, "disk-type raw is not one of: vmdk qcow2 vhd vhdx"), (ok, reason))
