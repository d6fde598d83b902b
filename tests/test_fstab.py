"""One fstab parser and one device resolver (imaging_elements.mount.fstab), shared by
the mounters and the validators: names resolve against the image's own
filesystems, never the host's."""

import os

from imaging_elements.mount import fstab
from imaging_elements.guest.guest import Guest, GuestPathError
from tests import base

FILESYSTEMS = [
    {"index": 1, "uuid": "ABCD-1234", "label": "my disk", "partuuid": "0badc0de-01", "partlabel": "EFI system",
     "fstype": "vfat", "root": False},
    {"index": 2, "uuid": "0b0070b0-1111-4222-8333-444455556666", "label": "rootfs",
     "partuuid": "0badc0de-02", "partlabel": "root", "fstype": "ext4", "root": True},
]
BARE = [{"index": 0, "uuid": "c0ffee00-1111-4222-8333-444455556666", "label": "cloudimg-rootfs",
         "partuuid": None, "partlabel": None, "fstype": "ext4", "root": True}]


class ResolveTest(base.TestCase):

    def index(self, spec, filesystems=FILESYSTEMS):
        found, reason = fstab.resolve(spec, filesystems)
        self.assertEqual(found is None, reason is not None, spec)
        return found["index"] if found else reason

    def test_tags_and_links(self):
        for spec, index in (
                ("UUID=abcd-1234", 1), ("UUID=ABCD-1234", 1), ('UUID="abcd-1234"', 1), ("LABEL=rootfs", 2),
                ("PARTUUID=0BADC0DE-02", 2), ("PARTLABEL=root", 2), ("uuid=abcd-1234", 1),
                ("/dev/disk/by-uuid/0b0070b0-1111-4222-8333-444455556666", 2),
                ("/dev/disk/by-label/rootfs", 2), ("/dev/disk/by-partuuid/0badc0de-01", 1),
                ("/dev/disk/by-partlabel/root", 2),
                # udev escapes a space in a label as \x20; fstab's own escape is \040 (parse() undoes it).
                ("/dev/disk/by-label/my\\x20disk", 1), ("/dev/disk/by-partlabel/EFI\\x20system", 1)):
            self.assertEqual(index, self.index(spec), spec)

    def test_labels_are_case_sensitive(self):
        self.assertEqual("LABEL=ROOTFS matches no filesystem of this image (its LABELs: my disk, rootfs)",
                         self.index("LABEL=ROOTFS"))

    def test_kernel_names_of_the_first_disk(self):
        for spec, index in (("/dev/sda1", 1), ("/dev/vda2", 2), ("/dev/xvda2", 2), ("/dev/hda1", 1),
                            ("/dev/nvme0n1p1", 1), ("/dev/mmcblk0p2", 2), ("/dev/root", 2)):
            self.assertEqual(index, self.index(spec), spec)

    def test_other_disks_and_whole_disks(self):
        for spec in ("/dev/sdb1", "/dev/nvme1n1p1", "/dev/mmcblk1p1", "/dev/xvdb"):
            self.assertEqual(f"{spec} is on a disk other than the first; this image is one disk",
                             self.index(spec))
        self.assertEqual("/dev/sda is the whole disk, which holds a partition table, not a filesystem",
                         self.index("/dev/sda"))
        self.assertEqual("/dev/sda3: this image has no partition 3", self.index("/dev/sda3"))

    def test_partition_image_is_the_first_partition(self):
        for spec in ("/dev/xvda1", "/dev/xvda", "/dev/sda1", "/dev/nvme0n1p1", "/dev/root",
                     "LABEL=cloudimg-rootfs"):
            self.assertEqual(0, self.index(spec, BARE), spec)
        self.assertEqual("/dev/xvda2: a partition image has one filesystem, seen as partition 1",
                         self.index("/dev/xvda2", BARE))

    def test_names_this_image_cannot_provide(self):
        self.assertEqual("/dev/disk/by-path/pci-0000:00:04.0-part1: /dev/disk/by-path names depend on the "
                         "machine's hardware; use UUID= or LABEL=",
                         self.index("/dev/disk/by-path/pci-0000:00:04.0-part1"))
        self.assertIn("by-id names depend on", self.index("/dev/disk/by-id/ata-QEMU_HARDDISK-part1"))
        self.assertEqual("SERIAL=x: unknown device tag SERIAL=", self.index("SERIAL=x"))
        self.assertEqual("/dev/md/0: not a device this image can provide", self.index("/dev/md/0"))
        self.assertEqual("/dev/root: no root filesystem found", self.index("/dev/root", FILESYSTEMS[:1]))

    def test_lvm_names_are_unsupported(self):
        for spec in ("/dev/mapper/vg0-root", "/dev/vg0/root"):
            with self.assertRaises(fstab.Unsupported) as caught:
                fstab.resolve(spec, FILESYSTEMS)
            self.assertIn("logical volumes inside images are not supported", str(caught.exception))

    def test_is_device(self):
        for spec in ("UUID=x", "label=x", "/dev/sda1", "/dev/disk/by-path/x"):
            self.assertTrue(fstab.is_device(spec), spec)
        for spec in ("tmpfs", "proc", "server:/export", "//server/share", "SERIAL", "/srv/data"):
            self.assertFalse(fstab.is_device(spec), spec)


class ParseTest(base.TestCase):

    def test_entries_escapes_and_defaults(self):
        entries, problems = fstab.parse(
            "# comment\n\nLABEL=my\\040disk /mnt/my\\040data ext4 ro,nofail 0 2\n/dev/sda2 /\n"
            "/swapfile none swap sw 0 0\ntmpfs /tmp tmpfs defaults 0 0\nserver:/x /srv nfs defaults 0 0\n"
            "/dev/sda1 data ext4 defaults 0 2\n/srv /var/srv none bind 0 0\n")
        self.assertEqual([], problems)
        mine, root, swap, tmp, nfs, relative, bind = entries
        self.assertEqual((3, "LABEL=my disk", "/mnt/my data", "ext4", ["ro", "nofail"], True),
                         (mine.lineno, mine.spec, mine.mountpoint, mine.fstype, mine.options, mine.optional))
        self.assertEqual(("auto", ["defaults"]), (root.fstype, root.options))
        self.assertEqual((True, False), (swap.swap, swap.relative))
        self.assertTrue(tmp.virtual)
        self.assertTrue(nfs.network)
        self.assertTrue(relative.relative)
        self.assertFalse(root.relative)
        self.assertTrue(bind.bind)

    def test_junk_lines_are_problems(self):
        entries, problems = fstab.parse("root:$6$salt:19000:0:::\nLABEL=x / ext4\nbad\x01line here\n")
        self.assertEqual(1, len(entries))
        self.assertEqual(["line 1 is not an fstab entry: 'root:$6$salt:19000:0:::'",
                          "line 3 is not an fstab entry: 'bad\\x01line here'"], problems)

    def test_read_through_the_guest(self):
        root = self.path("root")
        os.makedirs(os.path.join(root, "etc"))
        guest = Guest(root)
        with self.assertRaises(GuestPathError):
            fstab.read(guest)
        with open(os.path.join(root, "etc", "fstab"), "wb") as f:
            f.write(b"\x7fELF\0\0\0\x01\x02")
        self.assertRaisesRegex(fstab.FstabError, r"^/etc/fstab is not a text file", fstab.read, guest)
        # A link out of the image is followed inside it, never to the host's file.
        os.unlink(os.path.join(root, "etc", "fstab"))
        os.symlink("/etc/hostname", os.path.join(root, "etc", "fstab"))
        self.assertRaises(GuestPathError, fstab.read, guest)
        os.unlink(os.path.join(root, "etc", "fstab"))
        with open(os.path.join(root, "etc", "fstab"), "w") as f:
            f.write("LABEL=rootfs / ext4 defaults 0 1\n")
        entries, problems = fstab.read(guest)
        self.assertEqual(("LABEL=rootfs", "/"), (entries[0].spec, entries[0].mountpoint))
