"""The validate-windows element, on Windows-like trees and on a real NTFS disk.

The registry hives are real regf files written by hivex (see
tests/guestimages.py for the empty shell they start from); the NTFS image is
made by mkntfs and filled through ntfs-3g.
"""

import json
import os
import shutil

from tests import base
from tests.guestimages import hive, make_ntfs, windows_tree
from tests.imagebuild import make_disk
from tests.validators import hook_path, process, run_hook, write_filesystems

NTFS_FS = {"index": 1, "start": 1 << 20, "size": 24 << 20, "fstype": "ntfs", "label": "Windows",
           "uuid": "0123456789ABCDEF", "partuuid": "0a0b0c0d-01", "partlabel": None,
           "mountpoint": "/", "root": True}


def hook(name):
    return hook_path("validate-windows", name)


class TestWindowsChecks(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = self.path("root")
        self.work = self.path("work")
        os.makedirs(self.work)
        write_filesystems(self.work, [dict(NTFS_FS)])

    def check(self, name, code=0, **env):
        status, said, output = run_hook(hook(name), self.root, self.work, IMG_PLATFORM="windows", **env)
        self.assertEqual(code, status, f"{name}: {said} {output}")
        return said

    def fails(self, name):
        said = self.check(name, 1)
        self.assertEqual(1, len(said["fail"]), said)
        return said["fail"][0]

    def test_good_tree_passes(self):
        windows_tree(self.root)
        self.assertEqual(["registry hives present in /Windows/System32/config: SOFTWARE, SYSTEM, SAM, SECURITY, "
                          "DEFAULT"],
                         self.check("10-windows-hives")["describe"])
        self.assertEqual(["Windows: Windows Server 2019 Datacenter, version 10.0, build 17763, edition "
                          "ServerDatacenter (Server)"], self.check("20-windows-version")["describe"])
        self.assertEqual(["not hibernated: /hiberfil.sys is not a hibernation image"],
                         self.check("30-windows-hibernation")["describe"])
        self.assertEqual(["boot files: Windows Boot Manager (BIOS): /bootmgr, /Boot/BCD"],
                         self.check("40-windows-boot-files")["describe"])
        self.assertEqual(["paravirtual drivers: virtio viostor.sys, virtio netkvm.sys (file only, no service)"],
                         self.check("50-windows-pv-drivers")["describe"])

    def test_paths_are_case_insensitive(self):
        windows_tree(self.path("build"))
        os.makedirs(self.root)
        # As Windows XP wrote them: WINDOWS/system32/config/software.
        shutil.copytree(self.path("build", "Windows"), self.path("root", "WINDOWS"))
        os.rename(self.path("root", "WINDOWS", "System32"), self.path("root", "WINDOWS", "system32"))
        for name in os.listdir(self.path("root", "WINDOWS", "system32", "config")):
            os.rename(self.path("root", "WINDOWS", "system32", "config", name),
                      self.path("root", "WINDOWS", "system32", "config", name.lower()))
        self.check("10-windows-hives")
        self.assertIn("build 17763", self.check("20-windows-version")["describe"][0])

    def test_missing_and_fake_hives(self):
        windows_tree(self.root, hives=("SOFTWARE", "SYSTEM", "SAM"))
        with open(self.path("root", "Windows", "System32", "config", "SAM"), "wb") as f:
            f.write(b"not a hive")
        self.assertEqual("/Windows/System32/config: missing SECURITY (no such file or directory "
                         "(/Windows/System32/config/SECURITY)), DEFAULT (no such file or directory "
                         "(/Windows/System32/config/DEFAULT)); not registry hives: SAM", self.fails("10-windows-hives"))

    def test_version_keys_missing(self):
        windows_tree(self.root, software={r"\Microsoft\Windows NT\CurrentVersion": {"SystemRoot": "C:\\Windows"}})
        self.assertEqual("the SOFTWARE hive (/Windows/System32/config/SOFTWARE) has no ProductName or version "
                         "under Microsoft\\Windows NT\\CurrentVersion", self.fails("20-windows-version"))
        hive(self.path("root", "Windows", "System32", "config", "SOFTWARE"), {r"\Microsoft": {}})
        self.assertIn("cannot read the Windows version from the SOFTWARE hive: SOFTWARE\\\\Microsoft\\Windows NT\\"
                      "CurrentVersion:", self.fails("20-windows-version"))

    def test_older_windows_version_from_current_version(self):
        windows_tree(self.root, software={r"\Microsoft\Windows NT\CurrentVersion": {
            "ProductName": "Windows Server 2008 R2 Standard", "CurrentVersion": "6.1",
            "CurrentBuildNumber": "7601", "EditionID": "ServerStandard", "InstallationType": "Server"}})
        self.assertEqual(["Windows: Windows Server 2008 R2 Standard, version 6.1, build 7601, edition "
                          "ServerStandard (Server)"], self.check("20-windows-version")["describe"])

    def test_hibernated(self):
        windows_tree(self.root, hibernated=True)
        self.assertEqual("Windows is hibernated: /hiberfil.sys holds a hibernated system (signature 'HIBR'); "
                         "boot it and shut it down fully (Fast Startup off) before imaging",
                         self.fails("30-windows-hibernation"))

    def test_boot_files(self):
        windows_tree(self.root, boot_files=False)
        write_filesystems(self.work, [dict(NTFS_FS, index=2),
                                      dict(NTFS_FS, index=1, label="System Reserved", mountpoint=None, root=False)])
        self.assertEqual("no Windows boot files (bootmgr and Boot/BCD, EFI/Microsoft/Boot, or ntldr and boot.ini) "
                         "on /; not mounted, so not searched: partition 1, ntfs, label System Reserved, UUID "
                         "0123456789ABCDEF", self.fails("40-windows-boot-files"))
        # The System Reserved partition, mounted somewhere under the root, is searched.
        os.makedirs(self.path("root", "sysres", "EFI", "Microsoft", "Boot"))
        for name in ("bootmgfw.efi", "BCD"):
            with open(self.path("root", "sysres", "EFI", "Microsoft", "Boot", name), "wb") as f:
                f.write(b"x")
        write_filesystems(self.work, [dict(NTFS_FS, index=2), dict(NTFS_FS, index=1, mountpoint="/sysres", root=False)])
        self.assertEqual(["boot files: Windows Boot Manager (UEFI): /sysres/EFI/Microsoft/Boot/bootmgfw.efi, "
                          "/sysres/EFI/Microsoft/Boot/BCD"], self.check("40-windows-boot-files")["describe"])

    def test_no_pv_drivers(self):
        windows_tree(self.root, drivers=())
        self.assertEqual("no paravirtual drivers: none of viostor.sys, vioscsi.sys, netkvm.sys, xenvbd.sys, "
                         "xennet.sys, xenpci.sys, xenbus.sys in /Windows/System32/drivers; the instance will need "
                         "emulated disk and network devices", self.fails("50-windows-pv-drivers"))
        windows_tree(self.path("other"), drivers=("netkvm.sys",))
        shutil.copy(self.path("other", "Windows", "System32", "drivers", "netkvm.sys"),
                    self.path("root", "Windows", "System32", "drivers"))
        self.assertEqual("no paravirtual drivers: virtio netkvm.sys (file only, no service); the instance will "
                         "need emulated disk and network devices", self.fails("50-windows-pv-drivers"))

    def test_linux_hooks_decline_and_platform_check(self):
        windows_tree(self.root)
        status, said, _ = run_hook(hook_path("validate-common", "05-platform"), self.root, self.work,
                                   IMG_PLATFORM="windows", IMG_ELEMENTS="validate-windows validate-common")
        self.assertEqual((0, ["platform: windows"]), (status, said["describe"]))
        status, said, _ = run_hook(hook_path("validate-common", "05-platform"), self.root, self.work,
                                   IMG_PLATFORM="unknown", IMG_ELEMENTS="validate-linux")
        self.assertEqual(["IMG_PLATFORM is unknown, but the image looks like windows"], said["warn"])
        self.assertEqual(["validate-linux was asked for, but the image is windows: its linux checks would not run"],
                         said["fail"])


class TestWindowsDisk(base.TestCase):
    """An NTFS Windows disk through euca-image-process and the mounters."""

    needs_root = True

    def disk(self, **options):
        tree = windows_tree(self.path("tree"), **options)
        fs = make_ntfs(self.path("windows.ntfs"), tree)
        disk = make_disk(self.path("windows.raw"), [{"image": fs, "type": "7", "bootable": True}])
        os.unlink(fs)
        return disk

    def test_good_disk_passes_and_is_inspected(self):
        report = self.path("report.json")
        result, events = process(self, self.disk(), "mounters", "validate-windows", "inspect",
                                 args=("-e", "MIN_FREE_SPACE=1M", "-e", f"INSPECTION_REPORT={report}"), check=0)
        validators = {h: e for h, e in events.items() if e["phase"] == "validate"}
        self.assertEqual({"05-platform", "10-windows-hives", "20-windows-version", "30-windows-hibernation",
                          "40-windows-boot-files", "50-windows-pv-drivers", "70-free-space", "90-inspect"},
                         set(validators))
        self.assertEqual({"ok"}, {e["result"] for e in validators.values()}, validators)
        self.assertIn("Windows Server 2019 Datacenter, version 10.0, build 17763",
                      validators["20-windows-version"]["description"])
        with open(report) as f:
            inspection = json.load(f)
        self.assertEqual({"name": "windows", "distro": "windows", "product_name": "Windows Server 2019 Datacenter",
                          "product_variant": "Server", "major_version": 10, "minor_version": 0,
                          "hostname": "WIN-TEST01", "arch": "x86_64", "osinfo": "win2k19",
                          "windows_systemroot": "/Windows", "windows_current_control_set": "ControlSet001",
                          "build": "17763", "edition": "ServerDatacenter"},
                         {k: inspection[k] for k in ("name", "distro", "product_name", "product_variant",
                                                     "major_version", "minor_version", "hostname", "arch",
                                                     "osinfo", "windows_systemroot", "windows_current_control_set",
                                                     "build", "edition")})
        self.assertEqual([("ntfs", "Windows", "/")], [(fs["type"], fs["label"], fs["mountpoint"])
                                                      for fs in inspection["filesystems"]])

    def test_hibernated_disk_fails(self):
        result, events = process(self, self.disk(hibernated=True), "mounters", "validate-windows",
                                 args=("-e", "MIN_FREE_SPACE=1M"), check=1)
        self.assertEqual("failed", events["30-windows-hibernation"]["result"])
        self.assertIn("Windows is hibernated: /hiberfil.sys holds a hibernated system", result.stderr)
