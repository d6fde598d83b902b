"""The example elements in docs/examples work as the docs say."""

import os
import subprocess

from tests import base, imagebuild

EXAMPLES = os.path.join(base.ROOT, "docs", "examples")


class ExamplesTest(base.TestCase):

    def process(self, *args, check):
        return self.run_bin("euca-image-process", "--status-file", self.path("events.jsonl"), *args,
                            env={"ELEMENTS_PATH": EXAMPLES}, check=check)

    def disk(self):
        disk = imagebuild.make_disk(self.path("disk.raw"), [{"size": 8 * imagebuild.MiB}])
        with open(disk, "r+b") as f:
            f.seek(3 * imagebuild.MiB)
            f.write(os.urandom(100000))
        return disk

    def test_bash_validator(self):
        disk = self.disk()
        self.process("-i", disk, "max-size", check=0)
        result = self.process("-i", disk, "-e", "MAX_SIZE=1000", "max-size", check=1)
        self.assertIn(f"{disk} is {os.path.getsize(disk)} bytes, more than IMG_MAX_SIZE (1000)",
                      result.stderr)

    def test_python_converter(self):
        disk = self.disk()
        out = self.path("copy.raw")
        self.process("-i", disk, "-o", out, "raw-copy", check=0)
        subprocess.run(["cmp", disk, out], check=True)
        # Sparse: the copy allocates about what the data needs, not the 10 MiB size.
        self.assertLessEqual(os.stat(out).st_blocks * 512, 4 * imagebuild.MiB)
        listing = self.process("-i", disk, "-o", out + "2", "-T", "vmdk", "raw-copy", "--list", check=0)
        self.assertIn("impossible", listing.stdout)
