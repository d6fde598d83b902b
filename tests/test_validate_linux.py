"""The validate-linux and validate-common elements.

TestLinuxChecks runs each hook as the runner would, on a guest tree in a
directory with a filesystems.json beside it: many variants, fast.
TestLinuxImages builds real disk images with one defect each and runs them
through euca-image-process with the mounters, as a user would.
"""

import json
import os
import struct

from tests import base
from tests.guestimages import KERNEL, linux_disk, linux_root
from tests.imagebuild import MiB, make_fs
from tests.validators import ROOT_FS, accepts, hook_path, process, run_hook, write_filesystems


def hook(name):
    element = "validate-common" if name in ("05-platform", "70-free-space") else "validate-linux"
    return hook_path(element, name)


class LinuxTreeCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = self.path("root")
        self.work = self.path("work")
        os.makedirs(self.work)
        write_filesystems(self.work, [dict(ROOT_FS)])

    def tree(self, **changes):
        return linux_root(self.root, **changes)

    def check(self, name, code=0, **env):
        status, said, output = run_hook(hook(name), self.root, self.work, **env)
        self.assertEqual(code, status, f"{name}: {said} {output}")
        return said

    def fails(self, name, **env):
        said = self.check(name, 1, **env)
        self.assertEqual(1, len(said["fail"]), said)
        return said["fail"][0]


class TestLinuxChecks(LinuxTreeCase):

    def test_good_tree_passes_every_check(self):
        self.tree()
        names = sorted(os.listdir(os.path.join(base.ROOT, "elements", "validate-linux", "validate.d")))
        for name in names + ["05-platform"]:
            said = self.check(name)
            self.assertEqual([], said["fail"])
            self.assertTrue(said["describe"], name)
        self.assertIn("init: /sbin/init -> /lib/systemd/systemd", self.check("40-linux-init")["describe"])
        self.assertEqual(["network: DHCP on eth0 (ifupdown /etc/network/interfaces)"],
                         self.check("50-linux-network")["describe"])

    # -- release -----------------------------------------------------------------------
    def test_release_from_os_release_and_debian_version(self):
        self.tree()
        said = self.check("10-linux-release")
        self.assertEqual(["release: Debian GNU/Linux 12 (bookworm), distro debian version 12.8 "
                          "(from /etc/debian_version)"], said["describe"])

    def test_expected_rhel_but_no_redhat_release(self):
        self.tree()
        self.assertEqual("Expected RHEL/CentOS 5.x/6.x, but failed to find /etc/redhat-release",
                         self.fails("10-linux-release", IMG_EXPECT_DISTRO="rhel:5,6"))

    def test_expected_rhel_version_mismatch(self):
        self.tree(extra={"etc/redhat-release": "CentOS Linux release 7.9.2009 (Core)\n",
                         "etc/os-release": 'NAME="CentOS Linux"\nID="centos"\nVERSION_ID="7"\n'
                                           'PRETTY_NAME="CentOS Linux 7 (Core)"\n'},
                  remove=["etc/debian_version"])
        self.assertEqual("Expected RHEL/CentOS 5.x/6.x, but found CentOS Linux 7 (Core) (version 7.9)",
                         self.fails("10-linux-release", IMG_EXPECT_DISTRO="rhel:5,6"))
        self.check("10-linux-release", IMG_EXPECT_DISTRO="rhel:7")

    def test_rhel5_without_os_release(self):
        self.tree(extra={"etc/redhat-release": "Red Hat Enterprise Linux Server release 5.11 (Tikanga)\n"},
                  remove=["etc/os-release", "etc/debian_version"])
        said = self.check("10-linux-release", IMG_EXPECT_DISTRO="rhel:5,6")
        self.assertEqual(["release: Red Hat Enterprise Linux Server release 5.11 (Tikanga), distro rhel "
                          "version 5.11 (from /etc/redhat-release)"], said["describe"])

    def test_unsupported_and_unknown_distributions(self):
        self.tree(extra={"etc/os-release": 'ID=gentoo\nNAME=Gentoo\nPRETTY_NAME="Gentoo Linux"\n'},
                  remove=["etc/debian_version"])
        self.assertIn("Gentoo Linux (gentoo 0.0, from /etc/os-release) is not a supported distribution",
                      self.fails("10-linux-release"))
        os.unlink(os.path.join(self.root, "etc", "os-release"))
        self.assertIn("cannot tell the distribution: none of /etc/os-release", self.fails("10-linux-release"))

    # -- fstab ---------------------------------------------------------------------------
    def test_fstab_uuid_that_matches_nothing(self):
        self.tree(fstab="UUID=0badc0de-0000-4000-8000-000000000000 / ext4 defaults 0 1\n")
        self.assertEqual("/etc/fstab: line 1 (UUID=0badc0de-0000-4000-8000-000000000000 on /): "
                         "UUID=0badc0de-0000-4000-8000-000000000000 matches no filesystem of this image "
                         f"(its UUIDs: {ROOT_FS['uuid']})", self.fails("20-linux-fstab"))

    def test_fstab_forms_that_resolve(self):
        fstab = (f"# a comment\nUUID={ROOT_FS['uuid'].upper()} / ext4 defaults 0 1\n"
                 "PARTUUID=0a0b0c0d-01 /mnt/again ext4 defaults 0 0\n/dev/sda1 /mnt/sda ext4 ro 0 0\n"
                 "/dev/disk/by-label/rootfs /mnt/bylabel ext4 ro 0 0\nproc /proc proc defaults 0 0\n"
                 "tmpfs /tmp tmpfs defaults 0 0\nserver:/export /mnt/nfs nfs defaults 0 0\n"
                 "/swapfile none swap sw 0 0\n/var/tmp /mnt/bind none bind 0 0\n")
        self.tree(fstab=fstab, extra={"swapfile": b"\0" * 4096, **{f"mnt/{d}": ("dir",) for d in
                                      ("again", "sda", "bylabel", "nfs", "bind")}, "proc": ("dir",)})
        said = self.check("20-linux-fstab")
        self.assertEqual(["/etc/fstab: 9 entries; resolved in this image: / on UUID="
                          f"{ROOT_FS['uuid'].upper()}, /mnt/again on PARTUUID=0a0b0c0d-01, /mnt/sda on "
                          "/dev/sda1, /mnt/bylabel on /dev/disk/by-label/rootfs"], said["describe"])

    def test_fstab_problems(self):
        self.tree(fstab="LABEL=rootfs / ext4 defaults 0 1\n/dev/sdb1 /data ext4 defaults 0 2\n"
                        "/dev/sda2 /srv ext4 defaults 0 2\n/dev/mapper/vg-home /home ext4 defaults 0 2\n"
                        "LABEL=nosuch /opt ext4 defaults,nofail 0 2\nLABEL=rootfs /missing ext4 defaults 0 0\n")
        for d in ("data", "srv", "home", "opt"):
            os.makedirs(os.path.join(self.root, d))
        status, said, _ = run_hook(hook("20-linux-fstab"), self.root, self.work)
        self.assertEqual(1, status)
        self.assertEqual(["/etc/fstab: line 2 (/dev/sdb1 on /data): /dev/sdb1 is on a disk other than the "
                          "first; this image is one disk; line 3 (/dev/sda2 on /srv): /dev/sda2: this image "
                          "has no partition 2; line 4 (/dev/mapper/vg-home on /home): /dev/mapper/vg-home is "
                          "an LVM (device-mapper) name: logical volumes inside images are not supported; "
                          "line 6 (LABEL=rootfs on "
                          "/missing): the mount point /missing does not exist in the image"], said["fail"])
        self.assertEqual(["/etc/fstab line 5 (LABEL=nosuch on /opt): LABEL=nosuch matches no filesystem of "
                          "this image (its LABELs: rootfs) (the entry is nofail/noauto)"], said["warn"])

    def test_fstab_relative_mount_point_is_a_warning(self):
        self.tree(fstab="LABEL=rootfs / ext4 defaults 0 1\nLABEL=rootfs data ext4 defaults 0 2\n")
        said = self.check("20-linux-fstab")
        self.assertEqual(["/etc/fstab line 2 (LABEL=rootfs on data): the mount point is not an absolute "
                          "path; the guest will not mount it"], said["warn"])

    def test_fstab_without_root_entry_or_missing(self):
        self.tree(fstab="LABEL=rootfs /boot ext4 defaults 0 0\n")
        self.assertEqual("/etc/fstab: no entry mounts the root filesystem /", self.fails("20-linux-fstab"))
        os.unlink(os.path.join(self.root, "etc", "fstab"))
        self.assertEqual("/etc/fstab: no such file or directory (/etc/fstab)", self.fails("20-linux-fstab"))

    def test_fstab_root_on_another_partition(self):
        self.tree(fstab="LABEL=other / ext4 defaults 0 1\n")
        write_filesystems(self.work, [dict(ROOT_FS), dict(ROOT_FS, index=2, label="other", uuid="x",
                                                          mountpoint=None, root=False)])
        self.assertIn("names partition 2, ext4, label other, UUID x, but the image's root is partition 1",
                      self.fails("20-linux-fstab"))

    def test_hostile_fstab(self):
        # A link to /etc/shadow is the image's shadow: not an fstab, and never the host's.
        self.tree(extra={"etc/shadow": "root:$6$salt$hash:19000:0:99999:7:::\n"}, remove=["etc/fstab"])
        os.symlink("/etc/shadow", os.path.join(self.root, "etc", "fstab"))
        reason = self.fails("20-linux-fstab")
        self.assertIn("line 1 is not an fstab entry: 'root:$6$salt$hash:19000:0:99999:7:::'", reason)
        # Binary junk, and a file too large to be an fstab.
        os.unlink(os.path.join(self.root, "etc", "fstab"))
        with open(os.path.join(self.root, "etc", "fstab"), "wb") as f:
            f.write(b"\x7fELF\x02\x01\x01\x00" + os.urandom(512))
        self.assertEqual("/etc/fstab is not a text file (it holds binary data)", self.fails("20-linux-fstab"))
        with open(os.path.join(self.root, "etc", "fstab"), "wb") as f:
            f.truncate(3 << 30)
        self.assertEqual("/etc/fstab: too large to read (3221225472 bytes, the limit is 1048576)",
                         self.fails("20-linux-fstab"))

    def test_fstab_partition_image(self):
        self.tree(fstab="/dev/xvda1 / ext4 defaults 0 1\n")
        write_filesystems(self.work, [dict(ROOT_FS, index=0, start=0)])
        self.check("20-linux-fstab", IMG_DISK_TYPE="partition")

    def test_fstab_needs_filesystems_json(self):
        self.tree()
        os.unlink(os.path.join(self.work, "filesystems.json"))
        self.assertIn("no filesystems.json", self.fails("20-linux-fstab"))

    # -- kernel and boot loader ---------------------------------------------------------
    def test_no_kernel(self):
        self.tree(remove=[f"boot/vmlinuz-{KERNEL}"])
        self.assertEqual("no kernel in /boot (looked for vmlinuz-*, vmlinux-*, kernel-*, bzImage-*)",
                         self.fails("30-linux-kernel"))

    def test_kernel_without_initramfs_or_modules(self):
        self.tree(remove=[f"boot/initrd.img-{KERNEL}"])
        self.assertIn(f"/boot/vmlinuz-{KERNEL}: no initramfs (looked for /boot/initrd.img-{KERNEL}",
                      self.fails("30-linux-kernel"))
        self.tree(remove=[f"lib/modules/{KERNEL}"], extra={f"boot/initrd.img-{KERNEL}": b"initrd"})
        self.assertEqual(f"no usable kernel in /boot: /boot/vmlinuz-{KERNEL}: no /lib/modules/{KERNEL}",
                         self.fails("30-linux-kernel"))

    def test_rhel_names_and_usr_lib_modules(self):
        self.tree(extra={"boot/vmlinuz-5.14.0-362.el9.x86_64": b"k", "boot/initramfs-5.14.0-362.el9.x86_64.img": b"i",
                         "usr/lib/modules/5.14.0-362.el9.x86_64/modules.dep": ""},
                  remove=[f"boot/vmlinuz-{KERNEL}"])
        self.assertEqual(["kernel 5.14.0-362.el9.x86_64: /boot/vmlinuz-5.14.0-362.el9.x86_64, initramfs "
                          "/boot/initramfs-5.14.0-362.el9.x86_64.img, modules /lib/modules/5.14.0-362.el9.x86_64"],
                         self.check("30-linux-kernel")["describe"])

    def test_partition_image_own_or_external_kernel(self):
        self.tree()
        write_filesystems(self.work, [dict(ROOT_FS, index=0, start=0)])
        # Its own kernel, initramfs and modules are enough (partition-to-disk boots them) ...
        said = self.check("30-linux-kernel", IMG_DISK_TYPE="partition")
        self.assertIn("(a partition image booting its own kernel)", said["describe"][0])
        # ... without them, it needs an external kernel and ramdisk.
        os.unlink(os.path.join(self.root, "boot", f"initrd.img-{KERNEL}"))
        self.assertEqual("a partition (AMI) image boots an external kernel and ramdisk: give --kernel and "
                         f"--ramdisk (the image's own /boot/vmlinuz-{KERNEL} is not used)",
                         self.fails("30-linux-kernel", IMG_DISK_TYPE="partition"))
        # A kernel with a real x86 setup header naming its version, and a ramdisk.
        kernel = bytearray(0x400)
        kernel[0x202:0x206] = b"HdrS"
        struct.pack_into("<HH", kernel, 0x206, 0x20F, 0)
        struct.pack_into("<H", kernel, 0x20E, 0x100)  # version string at 0x100 + 0x200
        kernel[0x300:0x320] = b"5.10.0-99-amd64 (builder) #1\0"
        with open(self.path("vmlinuz"), "wb") as f:
            f.write(kernel)
        with open(self.path("initrd"), "wb") as f:
            f.write(b"initrd")
        said = self.check("30-linux-kernel", IMG_DISK_TYPE="partition", IMG_KERNEL=self.path("vmlinuz"),
                          IMG_RAMDISK=self.path("initrd"))
        self.assertEqual([f"partition image: external kernel {self.path('vmlinuz')} (5.10.0-99-amd64) and "
                          f"ramdisk {self.path('initrd')}"], said["describe"])
        self.assertEqual(["the external kernel is 5.10.0-99-amd64, but the image has no /lib/modules/"
                          "5.10.0-99-amd64: drivers built as modules will not load"], said["warn"])

    def test_bootloader(self):
        self.tree(remove=["boot/extlinux"])
        self.assertIn("no boot loader configuration (looked for /boot/grub/grub.cfg", self.fails("35-linux-bootloader"))
        grub = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.0-gone root=UUID=x ro\n\tinitrd /boot/initrd\n}\n"
        self.tree(extra={"boot/grub/grub.cfg": grub})
        self.assertEqual("/boot/grub/grub.cfg points at /boot/vmlinuz-6.0-gone, not a kernel in the image",
                         self.fails("35-linux-bootloader"))
        # A separate /boot: grub's paths are relative to it.
        self.tree(extra={"boot/grub/grub.cfg": grub.replace("/boot/vmlinuz-6.0-gone",
                                                             f"(hd0,msdos1)/vmlinuz-{KERNEL}")})
        self.assertEqual([f"grub2: /boot/grub/grub.cfg boots /boot/vmlinuz-{KERNEL}"],
                         self.check("35-linux-bootloader")["describe"])

    def test_bootloader_config_too_large_to_read(self):
        self.tree()
        with open(os.path.join(self.root, "boot", "extlinux", "extlinux.conf"), "wb") as f:
            f.truncate(1 << 30)  # sparse: 1 GiB that is never read
        self.assertEqual("/boot/extlinux/extlinux.conf: too large to read (1073741824 bytes, the limit is "
                         "1048576)", self.fails("35-linux-bootloader"))

    def test_bootloader_bls_entries(self):
        self.tree(remove=["boot/extlinux"], extra={
            "boot/grub2/grub.cfg": "insmod blscfg\nblscfg\n",
            "boot/loader/entries/abc-6.1.conf":
                f"title Linux\nlinux /vmlinuz-{KERNEL}\noptions root=LABEL=rootfs console=ttyS0\n"})
        self.assertEqual([f"grub2: /boot/grub2/grub.cfg boots /boot/vmlinuz-{KERNEL}"],
                         self.check("35-linux-bootloader")["describe"])
        self.assertIn("console=ttyS0", self.check("62-linux-serial-console")["describe"][0])

    def test_bootloader_declines_partition_images(self):
        self.tree()
        write_filesystems(self.work, [dict(ROOT_FS, index=0, start=0)])
        self.assertEqual((False, "a partition (AMI) image is booted with an external kernel, not a boot loader"),
                         accepts(hook("35-linux-bootloader"), self.root, self.work))

    # -- init ------------------------------------------------------------------------------
    def test_no_init(self):
        self.tree(remove=["sbin/init", "lib/systemd/systemd"])
        self.assertEqual("no init the kernel can run: none of /sbin/init, /etc/init, /bin/init exists",
                         self.fails("40-linux-init"))

    def test_init_escaping_the_image(self):
        # On the host, ../../.. from the mount point reaches the host's /usr/bin/env, which exists.
        self.tree(extra={"sbin/init": ("symlink", "../../../../../../../../usr/bin/env")}, remove=["sbin/init"])
        self.assertTrue(os.path.exists(os.path.join(self.root, "sbin", "init")))  # what a naive check sees
        self.assertEqual("no init the kernel can run: /sbin/init -> ../../../../../../../../usr/bin/env: "
                         "no such file or directory (/usr/bin/env); /lib/systemd/systemd is there, but nothing "
                         "starts it (no working /sbin/init, no init= on the kernel command line)",
                         self.fails("40-linux-init"))

    def test_init_loop_and_not_executable(self):
        self.tree(extra={"sbin/init": ("symlink", "/sbin/init2"), "sbin/init2": ("symlink", "/sbin/init")},
                  remove=["sbin/init"])
        self.assertIn("/sbin/init -> /sbin/init2: too many levels of symbolic links", self.fails("40-linux-init"))
        self.tree(extra={"sbin/init": b"\x7fELF"}, remove=["sbin/init", "sbin/init2"])
        self.assertIn("/sbin/init (/sbin/init) is not executable", self.fails("40-linux-init"))

    def test_init_from_the_kernel_command_line(self):
        self.tree(remove=["sbin/init"], extra={"boot/extlinux/extlinux.conf":
                  f"LABEL l\n  LINUX /boot/vmlinuz-{KERNEL}\n  APPEND root=LABEL=rootfs init=/lib/systemd/systemd\n"})
        self.assertEqual(["init: /lib/systemd/systemd (init= on the kernel command line)"],
                         self.check("40-linux-init")["describe"])

    # -- network ---------------------------------------------------------------------------
    def test_static_ip_only(self):
        self.tree(extra={"etc/network/interfaces": "auto lo\niface lo inet loopback\nauto eth0\n"
                         "iface eth0 inet static\n  address 10.1.2.3/24\n  gateway 10.1.2.1\n"})
        self.assertEqual("no DHCP on the first network interface: eth0 is static (ifupdown "
                         "/etc/network/interfaces (address 10.1.2.3/24)); cloud-init's fallback network "
                         "configuration does not override the static eth0 (looked at ifupdown, netplan, ifcfg, "
                         "systemd-networkd, NetworkManager, cloud-init)", self.fails("50-linux-network"))

    def test_dhcp_on_second_interface_only(self):
        self.tree(extra={"etc/network/interfaces": "source-directory /etc/network/interfaces.d\n",
                         "etc/network/interfaces.d/eth1": "iface eth1 inet dhcp\n"}, remove=["usr/bin/cloud-init"])
        self.assertIn("DHCP only on eth1 (ifupdown /etc/network/interfaces.d/eth1), not the first interface",
                      self.fails("50-linux-network"))

    def test_network_configurations(self):
        cases = {
            "netplan": ({"etc/netplan/50-cloud.yaml":
                         "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n"},
                        "DHCP on ens3 (netplan /etc/netplan/50-cloud.yaml)"),
            "ifcfg": ({"etc/sysconfig/network-scripts/ifcfg-eth0": 'DEVICE=eth0\nBOOTPROTO="dhcp"\nONBOOT=yes\n'},
                      "DHCP on eth0 (ifcfg /etc/sysconfig/network-scripts/ifcfg-eth0)"),
            "networkd": ({"etc/systemd/network/20-wired.network": "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n",
                          "etc/systemd/system/multi-user.target.wants/systemd-networkd.service":
                              ("symlink", "/lib/systemd/system/systemd-networkd.service"),
                          "lib/systemd/system/systemd-networkd.service": "[Service]\n"},
                         "DHCP on ens3 (systemd-networkd /etc/systemd/network/20-wired.network)"),
            "nm": ({"usr/sbin/NetworkManager": b"\x7fELF", "etc/NetworkManager/system-connections/eth.nmconnection":
                    "[connection]\nid=eth\ntype=ethernet\ninterface-name=eth0\n\n[ipv4]\nmethod=auto\n"},
                   "DHCP on eth0 (NetworkManager /etc/NetworkManager/system-connections/eth.nmconnection)"),
        }
        for name, (files, expected) in cases.items():
            self.tree(extra=dict(files, **{"etc/network/interfaces": "auto lo\niface lo inet loopback\n"}))
            self.assertEqual([f"network: {expected}"], self.check("50-linux-network")["describe"], name)
            for path in files:
                os.unlink(os.path.join(self.root, path))

    def test_netplan_static_and_cloud_init_fallback(self):
        self.tree(extra={"etc/network/interfaces": "auto lo\niface lo inet loopback\n",
                         "etc/netplan/01.yaml": "network:\n  ethernets:\n    eth0:\n      addresses: [10.0.0.5/8]\n"},
                  remove=["usr/bin/cloud-init"])
        self.assertIn("eth0 is static (netplan /etc/netplan/01.yaml (addresses 10.0.0.5/8))",
                      self.fails("50-linux-network"))
        # cloud-init's fallback DHCPs the first NIC, but never over a static configuration.
        self.tree(extra={"usr/bin/cloud-init": "#!/usr/bin/python3\n"})
        self.assertIn("cloud-init's fallback network configuration does not override the static eth0",
                      self.fails("50-linux-network"))
        self.tree(remove=["etc/netplan/01.yaml"])
        self.assertEqual(["network: DHCP on first interface (cloud-init's fallback network configuration)"],
                         self.check("50-linux-network")["describe"])

    def test_persistent_net_rules(self):
        self.tree(extra={"etc/udev/rules.d/70-persistent-net.rules":
                         '# generated\nSUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", '
                         'ATTR{address}=="52:54:00:12:34:56", ATTR{type}=="1", KERNEL=="eth*", NAME="eth0"\n',
                         "etc/sysconfig/network-scripts/ifcfg-eth0":
                         "DEVICE=eth0\nBOOTPROTO=dhcp\nHWADDR=52:54:00:12:34:56\n"})
        self.assertEqual("interface names pinned to MAC addresses: /etc/udev/rules.d/70-persistent-net.rules pins "
                         "eth0 to MAC 52:54:00:12:34:56; /etc/sysconfig/network-scripts/ifcfg-eth0 pins eth0 to HWADDR "
                         "52:54:00:12:34:56 (on a new instance the first NIC gets another name)",
                         self.fails("51-linux-persistent-net"))

    # -- optional checks -------------------------------------------------------------------
    def test_sshd_key_injection_serial_console(self):
        self.tree(remove=["etc/systemd/system/multi-user.target.wants/ssh.service", "usr/bin/cloud-init",
                          "boot/extlinux"])
        self.assertEqual("/usr/sbin/sshd is installed but not started at boot (no systemd unit or rc link enabled)",
                         self.fails("60-linux-sshd"))
        self.assertIn("no key injection: no cloud-init", self.fails("61-linux-key-injection"))
        self.assertIn("no serial console", self.fails("62-linux-serial-console"))
        self.tree(extra={"etc/rc.local": "#!/bin/sh\ncurl -s http://169.254.169.254/latest/meta-data/public-keys/0/openssh-key"
                                         " > /root/.ssh/authorized_keys\n",
                         "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service": ("symlink", "/dev/null")})
        self.assertEqual(["key injection: /etc/rc.local reads the metadata service 169.254.169.254"],
                         self.check("61-linux-key-injection")["describe"])
        self.assertEqual(["serial console: serial-getty@ttyS0.service enabled"],
                         self.check("62-linux-serial-console")["describe"])
        os.remove(os.path.join(self.root, "usr", "sbin", "sshd"))
        self.assertIn("no SSH server", self.fails("60-linux-sshd"))

    def test_free_space_floor(self):
        self.tree()
        reason = self.fails("70-free-space", IMG_MIN_FREE_SPACE="1000P")
        self.assertRegex(reason, r"^/ has \d+ MiB free, below the floor of 1073741824000 MiB$")
        self.assertIn("not a size", self.fails("70-free-space", IMG_MIN_FREE_SPACE="lots"))

    def test_platform(self):
        self.tree()
        self.assertEqual(["platform: linux"], self.check("05-platform", IMG_ELEMENTS="validate-linux")["describe"])
        self.assertEqual("validate-windows was asked for, but the image is linux: its windows checks would not run",
                         self.fails("05-platform", IMG_ELEMENTS="validate-windows validate-common"))
        empty = self.path("empty")
        os.makedirs(empty)
        status, said, _ = run_hook(hook("05-platform"), empty, self.work, IMG_PLATFORM="unknown")
        self.assertEqual(1, status)
        self.assertIn("cannot tell the image's platform", said["fail"][0])


class TestLinuxImages(base.TestCase):
    """Real disk images, one defect each, through euca-image-process and the mounters."""

    needs_root = True
    ELEMENTS = ("mounters", "validate-linux", "inspect")

    def image(self, **changes):
        return linux_disk(self.path(f"disk-{len(os.listdir(self.tmp))}.raw"), self.tmp, **changes)

    def run_process(self, image, *args, check=None):
        return process(self, image, *self.ELEMENTS, args=("-e", "MIN_FREE_SPACE=4M") + args, check=check)

    def failed(self, image, hook, *args):
        result, events = self.run_process(image, *args, check=1)
        self.assertEqual("failed", events[hook]["result"], events)
        self.assertIn(f"validate/{hook} (validate-linux) failed: {events[hook]['reason']}", result.stderr)
        return events[hook]["reason"]

    def test_good_image_passes(self):
        report = self.path("report.json")
        result, events = self.run_process(self.image(), "-e", f"INSPECTION_REPORT={report}", check=0)
        validators = {h: e for h, e in events.items() if e["phase"] == "validate"}
        self.assertEqual({"ok"}, {e["result"] for e in validators.values()}, validators)
        self.assertEqual(13, len(validators))  # 12 checks and the inspection
        self.assertIn("validators: 13 passed, 0 warnings, 0 failed", result.stderr)
        with open(report) as f:
            inspection = json.load(f)
        self.assertEqual(("linux", "debian", 12, 8, "testguest", "x86_64"),
                         tuple(inspection[k] for k in ("name", "distro", "major_version", "minor_version",
                                                       "hostname", "arch")))
        self.assertEqual([("ext4", "rootfs", "/")], [(fs["type"], fs["label"], fs["mountpoint"])
                                                     for fs in inspection["filesystems"]])

    def test_fstab_uuid_matches_nothing(self):
        reason = self.failed(self.image(fstab="UUID=0badc0de-0000-4000-8000-000000000000 / ext4 defaults 0 1\n"),
                             "20-linux-fstab")
        self.assertRegex(reason, r"^/etc/fstab: line 1 \(UUID=0badc0de-0000-4000-8000-000000000000 on /\): "
                                 r"UUID=0badc0de-0000-4000-8000-000000000000 matches no filesystem of this image "
                                 r"\(its UUIDs: [0-9a-f-]{36}\)$")

    def test_no_kernel(self):
        self.assertEqual("no kernel in /boot (looked for vmlinuz-*, vmlinux-*, kernel-*, bzImage-*)",
                         self.failed(self.image(remove=[f"boot/vmlinuz-{KERNEL}"]), "30-linux-kernel"))

    def test_static_ip_only(self):
        image = self.image(extra={"etc/network/interfaces":
                                  "auto eth0\niface eth0 inet static\n  address 192.0.2.10/24\n"},
                           remove=["usr/bin/cloud-init"])
        self.assertIn("no DHCP on the first network interface: eth0 is static (ifupdown /etc/network/interfaces "
                      "(address 192.0.2.10/24))", self.failed(image, "50-linux-network"))

    def test_persistent_net_rules_warn(self):
        image = self.image(extra={"etc/udev/rules.d/70-persistent-net.rules":
                                  'SUBSYSTEM=="net", ATTR{address}=="52:54:00:ab:cd:ef", NAME="eth0"\n'})
        result, events = self.run_process(image, check=0)
        self.assertEqual("warning", events["51-linux-persistent-net"]["result"])
        self.assertIn("/etc/udev/rules.d/70-persistent-net.rules pins eth0 to MAC 52:54:00:ab:cd:ef",
                      events["51-linux-persistent-net"]["reason"])
        self.assertIn("validators: 12 passed, 1 warnings, 0 failed", result.stderr)

    def test_no_init(self):
        # The mounters already refuse a root with no init (the image's fault: exit 3); the message says so.
        result, events = self.run_process(self.image(remove=["sbin/init", "lib/systemd/systemd"]), check=3)
        self.assertIn("has /etc/fstab but no init", result.stderr)
        self.assertNotIn("40-linux-init", events)

    def test_init_symlink_escaping_the_image(self):
        image = self.image(extra={"sbin/init": ("symlink", "../../../../../../../../usr/bin/env")},
                           remove=["sbin/init"])
        self.assertEqual("no init the kernel can run: /sbin/init -> ../../../../../../../../usr/bin/env: no such "
                         "file or directory (/usr/bin/env); /lib/systemd/systemd is there, but nothing starts it "
                         "(no working /sbin/init, no init= on the kernel command line)",
                         self.failed(image, "40-linux-init"))

    def test_partition_image_kernel(self):
        tree = linux_root(self.path("tree"), fstab="/dev/sda1 / ext4 defaults 0 1\n",
                          remove=[f"boot/initrd.img-{KERNEL}"])
        image = make_fs(self.path("ami.img"), tree, size=24 * MiB, label="rootfs")
        self.assertIn("a partition (AMI) image boots an external kernel and ramdisk: give --kernel and --ramdisk",
                      self.failed(image, "30-linux-kernel"))
        for name in ("vmlinuz", "initrd"):
            with open(self.path(name), "wb") as f:
                f.write(name.encode())
        result, events = self.run_process(image, "--kernel", self.path("vmlinuz"), "--ramdisk", self.path("initrd"),
                                          check=0)
        self.assertEqual("ok", events["30-linux-kernel"]["result"])
        self.assertNotIn("35-linux-bootloader", events)  # declined: no boot loader on an AMI
