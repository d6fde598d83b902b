"""The inspection report (imaging_elements.guest.guestinfo.inspect and the inspect element).

On guest trees: the report's fields, package databases of each format, a
Windows guest read through hivex, hostile files; the hook's JSON outputs.
The real Debian 12 disk and the comparison with virt-inspector are in
tests/test_validate_debian.py, the NTFS disk in tests/test_validate_windows.py.
"""

import json
import os
import sqlite3
import subprocess
import sys

from imaging_elements.guest import guestinfo
from tests import base
from tests.guestimages import linux_root, windows_tree
from tests.validators import ROOT_FS, hook_path, run_hook, write_filesystems


class TestInspectLinux(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = linux_root(self.path("root"))

    def test_fields(self):
        report = guestinfo.inspect(self.root, "linux", [dict(ROOT_FS)])
        self.assertEqual({"name": "linux", "arch": "x86_64", "distro": "debian", "product_name": "12.8",
                          "pretty_name": "Debian GNU/Linux 12 (bookworm)", "major_version": 12, "minor_version": 8,
                          "hostname": "testguest", "osinfo": "debian12", "package_format": None,
                          "package_management": None, "package_count": None, "product_variant": None,
                          "kernels": [{"version": "6.1.0-test", "kernel": "/boot/vmlinuz-6.1.0-test",
                                       "initramfs": "/boot/initrd.img-6.1.0-test",
                                       "modules": "/lib/modules/6.1.0-test"}],
                          "filesystems": [{"index": 1, "type": "ext4", "label": "rootfs", "uuid": ROOT_FS["uuid"],
                                           "mountpoint": "/", "root": True}],
                          "mountpoints": {"/": 1}, "errors": []}, report)

    def test_platform_detected_when_unknown(self):
        self.assertEqual("linux", guestinfo.inspect(self.root, "unknown", [])["name"])

    def test_dpkg_status(self):
        status = "".join(f"Package: p{i}\nStatus: install ok installed\nVersion: 1\n\n" for i in range(7))
        status += "Package: gone\nStatus: deinstall ok config-files\n\n"
        linux_root(self.root, extra={"var/lib/dpkg/status": status, "usr/bin/apt-get": b"\x7fELF"})
        report = guestinfo.inspect(self.root, "linux", [])
        self.assertEqual(("deb", "apt", 7), (report["package_format"], report["package_management"],
                                             report["package_count"]))

    def test_rpm_sqlite_database(self):
        linux_root(self.root, extra={
            "etc/os-release": 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=39\nPRETTY_NAME="Fedora Linux 39"\n',
            "usr/bin/dnf": b"#!/usr/bin/python3\n", "var/lib/rpm/.keep": ""}, remove=["etc/debian_version"])
        with sqlite3.connect(os.path.join(self.root, "var", "lib", "rpm", "rpmdb.sqlite")) as db:
            db.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB)")
            db.executemany("INSERT INTO Packages (blob) VALUES (?)", [(b"x",)] * 5)
        db_files = sorted(os.listdir(os.path.join(self.root, "var", "lib", "rpm")))
        report = guestinfo.inspect(self.root, "linux", [])
        self.assertEqual(("fedora", "Fedora Linux 39", 39, "fedora39", "rpm", "dnf", 5),
                         tuple(report[k] for k in ("distro", "product_name", "major_version", "osinfo",
                                                   "package_format", "package_management", "package_count")))
        # Read-only and immutable: no journal or WAL file appeared beside the database.
        self.assertEqual(db_files, sorted(os.listdir(os.path.join(self.root, "var", "lib", "rpm"))))

    def test_apk_database(self):
        linux_root(self.root, extra={"etc/os-release":
                                     "ID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME=\"Alpine Linux v3.19\"\n",
                                     "lib/apk/db/installed": "P:musl\nV:1\n\nP:busybox\nV:1\n\n"},
                   remove=["etc/debian_version"])
        report = guestinfo.inspect(self.root, "linux", [])
        self.assertEqual(("alpinelinux", 3, 19, "apk", 2), tuple(report[k] for k in (
            "distro", "major_version", "minor_version", "package_format", "package_count")))

    def test_hostile_files(self):
        # The hostname links out of the image, /bin/bash loops: nothing leaks, nothing hangs.
        linux_root(self.root, extra={"etc/hostname": ("symlink", "../../../../../../etc/hostname"),
                                     "bin/bash": ("symlink", "bash"), "bin/ls": b"#!junk"})
        report = guestinfo.inspect(self.root, "linux", [])
        self.assertIsNone(report["hostname"])
        self.assertIsNone(report["arch"])
        linux_root(self.root, extra={"etc/hostname": b"\x80\x81\x00bad\x00name\n"})
        self.assertEqual("\ufffd\ufffd\ufffdbad\ufffdname", guestinfo.inspect(self.root, "linux", [])["hostname"])

    def test_readable_text(self):
        text = guestinfo.format_report(guestinfo.inspect(self.root, "linux", [dict(ROOT_FS)]))
        self.assertEqual(["OS type: linux", "distro: debian", "version: 12.8", "product name: 12.8",
                          "release: Debian GNU/Linux 12 (bookworm)", "osinfo: debian12", "hostname: testguest",
                          "architecture: x86_64",
                          "kernel: 6.1.0-test (/boot/vmlinuz-6.1.0-test, initramfs /boot/initrd.img-6.1.0-test)",
                          f"filesystem: partition 1, ext4, label rootfs, UUID {ROOT_FS['uuid']}, mounted on /"],
                         text.splitlines())

    def test_command_line(self):
        result = subprocess.run([sys.executable, "-m", "imaging_elements.guest.guestinfo", "--root", self.root,
                                 "--json"],
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=base.ROOT))
        self.assertEqual("testguest", json.loads(result.stdout)["hostname"])


class TestInspectWindows(base.TestCase):

    def test_fields_from_the_hives(self):
        root = windows_tree(self.path("root"))
        report = guestinfo.inspect(root, "windows", [])
        self.assertEqual({"name": "windows", "distro": "windows", "product_name": "Windows Server 2019 Datacenter",
                          "product_variant": "Server", "major_version": 10, "minor_version": 0,
                          "hostname": "WIN-TEST01", "arch": "x86_64", "osinfo": "win2k19", "build": "17763",
                          "edition": "ServerDatacenter", "windows_systemroot": "/Windows",
                          "windows_current_control_set": "ControlSet001", "errors": []},
                         {k: report[k] for k in ("name", "distro", "product_name", "product_variant", "major_version",
                                                 "minor_version", "hostname", "arch", "osinfo", "build", "edition",
                                                 "windows_systemroot", "windows_current_control_set", "errors")})

    def test_damaged_hive_is_an_error_in_the_report(self):
        root = windows_tree(self.path("root"))
        with open(os.path.join(root, "Windows", "System32", "config", "SOFTWARE"), "r+b") as f:
            f.seek(4096)
            f.write(b"\0" * 4096)  # the first hive bin is gone
        report = guestinfo.inspect(root, "windows", [])
        self.assertEqual(1, len(report["errors"]))
        self.assertIn("SOFTWARE", report["errors"][0])
        self.assertIsNone(report["product_name"])


class TestInspectHook(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = linux_root(self.path("root"))
        self.work = self.path("work")
        os.makedirs(self.work)
        write_filesystems(self.work, [dict(ROOT_FS)])

    def test_writes_both_reports(self):
        target = self.path("out", "report.json")
        os.makedirs(self.path("out"))
        status, said, _ = run_hook(hook_path("inspect", "90-inspect"), self.root, self.work,
                                   IMG_INSPECTION_REPORT=target)
        self.assertEqual(0, status, said)
        with open(target) as f, open(os.path.join(self.work, "inspection.json")) as g:
            self.assertEqual(json.load(f), json.load(g))
        self.assertEqual(["report.json"], os.listdir(self.path("out")))  # no temporary left
        self.assertIn("hostname: testguest", said["describe"])
        self.assertEqual(f"inspection report: {self.work}/inspection.json, {target}", said["describe"][-1])

    def test_unwritable_report_fails_with_the_path(self):
        target = self.path("missing-dir", "report.json")
        status, said, _ = run_hook(hook_path("inspect", "90-inspect"), self.root, self.work,
                                   IMG_INSPECTION_REPORT=target)
        self.assertEqual(1, status)
        self.assertEqual([f"{target}: cannot write the inspection report: No such file or directory"], said["fail"])
