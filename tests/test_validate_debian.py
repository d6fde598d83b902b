"""End to end on a real Debian 12 root (tests/images/mkdebian, from the Debian
mirror with mmdebstrap, cached): a whole disk in a streamOptimized VMDK,
mounted by the mounters, checked by validate-linux, inspected by inspect.

The expected facts are read from the tarball itself, not written here; with
IMG_TEST_VIRT_INSPECTOR=1 the report is also compared with libguestfs'
virt-inspector on the same VMDK (about 30 s: it boots an appliance under TCG).
"""

import json
import os
import re
import tarfile

from tests import base
from tests.guestimages import debian_vmdk, virt_inspector
from tests.imagebuild import debian_tarball
from tests.validators import process

IMAGE = None
FACTS = {}


def setUpModule():
    global IMAGE
    if os.geteuid() != 0:
        return
    IMAGE = debian_vmdk()
    with tarfile.open(debian_tarball()) as tar:
        names = tar.getnames()
        read = lambda name: tar.extractfile(name).read().decode()  # noqa: E731
        FACTS["kernels"] = sorted({m.group(1) for n in names
                                   if (m := re.match(r"^\./usr/lib/modules/([^/]+)/modules\.dep$", n))})
        FACTS["debian_version"] = read("./etc/debian_version").strip()
        FACTS["hostname"] = read("./etc/hostname").strip()
        status = read("./var/lib/dpkg/status")
        FACTS["packages"] = sum("Status: install ok installed" in p.splitlines() for p in status.split("\n\n"))


class TestDebian(base.TestCase):

    needs_root = True

    def run_debian(self):
        report = self.path("report.json")
        result, events = process(self, IMAGE, "mounters", "validate-linux", "inspect",
                                 args=("-e", f"INSPECTION_REPORT={report}"), check=0)
        with open(report) as f:
            return result, events, json.load(f)

    def test_debian_vmdk_passes_and_is_inspected(self):
        result, events, report = self.run_debian()
        validators = {h: e for h, e in events.items() if e["phase"] == "validate"}
        # Everything required passes; mkdebian installs no cloud-init, so the
        # optional key-injection check warns and the process goes on.
        self.assertEqual({"61-linux-key-injection"}, {h for h, e in validators.items() if e["result"] != "ok"})
        self.assertEqual("warning", validators["61-linux-key-injection"]["result"])
        version = FACTS["debian_version"]
        self.assertEqual(f"release: Debian GNU/Linux 12 (bookworm), distro debian version {version} "
                         "(from /etc/debian_version)", validators["10-linux-release"]["description"])
        self.assertEqual("init: /sbin/init -> /usr/lib/systemd/systemd", validators["40-linux-init"]["description"])
        self.assertEqual("network: DHCP on ens3 (ifupdown /etc/network/interfaces)",
                         validators["50-linux-network"]["description"])
        self.assertIn("ssh: /usr/sbin/sshd, started by /etc/systemd/system/multi-user.target.wants/ssh.service",
                      validators["60-linux-sshd"]["description"])
        major, minor = (int(x) for x in version.split(".")[:2])
        self.assertEqual({"name": "linux", "distro": "debian", "product_name": version, "major_version": major,
                          "minor_version": minor, "hostname": FACTS["hostname"], "arch": "x86_64",
                          "osinfo": "debian12", "package_format": "deb", "package_management": "apt",
                          "package_count": FACTS["packages"]},
                         {k: report[k] for k in ("name", "distro", "product_name", "major_version", "minor_version",
                                                 "hostname", "arch", "osinfo", "package_format",
                                                 "package_management", "package_count")})
        self.assertEqual(FACTS["kernels"], [k["version"] for k in report["kernels"]])
        self.assertEqual([("ext4", "rootfs", "/", True)],
                         [(fs["type"], fs["label"], fs["mountpoint"], fs["root"]) for fs in report["filesystems"]])
        self.assertIn("validators: 12 passed, 1 warnings, 0 failed", result.stderr)

    def test_same_as_virt_inspector(self):
        if os.environ.get("IMG_TEST_VIRT_INSPECTOR") != "1":
            self.skipTest("set IMG_TEST_VIRT_INSPECTOR=1 to compare with virt-inspector (about 30 s)")
        reference = virt_inspector(IMAGE, "vmdk")
        if reference is None:
            self.skipTest("virt-inspector is not installed (package libguestfs-tools)")
        _, _, report = self.run_debian()
        ours = {k: report[k] for k in reference if k in report and k != "filesystems"}
        self.assertEqual({k: v for k, v in reference.items() if k != "filesystems"}, ours)
        self.assertEqual(reference["filesystems"],
                         sorted((fs["type"], fs["label"], fs["uuid"]) for fs in report["filesystems"]))
