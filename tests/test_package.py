"""The package as a user gets it: `python -m build`, then `pip install` of the
wheel and of the checkout (not editable) into fresh virtualenvs outside the
checkout, and the installed commands doing real work.

The sdist and the wheel are built once per test run (--no-isolation: the
build tools are in test-requirements.txt); the dependencies' wheels are
fetched once into the test cache and installed from there (--no-index), so a
run needs the network only the first time.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from tests import base, imagebuild

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = imagebuild.MiB
STOCK_ELEMENTS = 16
DRIVERS = ("euca-image-process", "element-info", "euca-bundle-image", "euca-unbundle")
DIST = None


def sh(*argv, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode:
        raise AssertionError(f"{' '.join(map(str, argv))}: exit {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result.stdout


def wheelhouse():
    """The dependencies' wheels (and the build backend's), fetched once into the test cache."""
    with open(os.path.join(ROOT, "requirements.txt"), "rb") as f:
        key = hashlib.sha256(f.read() + b"setuptools wheel").hexdigest()[:12]

    def build(out):
        os.makedirs(out)
        sh(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", out,
           "-r", os.path.join(ROOT, "requirements.txt"), "setuptools>=61", "wheel")
    return imagebuild._cached(f"wheels-{key}", build)


@contextlib.contextmanager
def building():
    """One build from the checkout at a time: a build writes its egg-info and
    staging directories into the checkout, and test workers run in parallel."""
    os.makedirs(imagebuild.CACHE, exist_ok=True)
    with open(os.path.join(imagebuild.CACHE, ".lock-package-build"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def setUpModule():
    global DIST
    DIST = tempfile.mkdtemp(prefix="test-package-")
    with building():
        sh(sys.executable, "-m", "build", "--no-isolation", "-o", DIST, ROOT)


def tearDownModule():
    shutil.rmtree(DIST, ignore_errors=True)


def dist(suffix):
    [name] = [n for n in os.listdir(DIST) if n.endswith(suffix)]
    return os.path.join(DIST, name)


class PackageTest(base.TestCase):
    needs_root = True  # the process test mounts a real image

    def venv(self, *installs):
        """A fresh virtualenv in the test's directory (outside the checkout); each of
        `installs` (a list of pip arguments) installed in turn."""
        venv = self.path("venv")
        sh(sys.executable, "-m", "venv", venv)
        python = os.path.join(venv, "bin", "python")
        for install in installs:
            sh(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
               "--find-links", wheelhouse(), *install, cwd=self.tmp, env=self.env())
        return venv

    def env(self):
        # Nothing of the checkout or of the test run's own interpreter leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        return dict(env, TMPDIR=self.tmp, PATH="/usr/sbin:/usr/bin:/sbin:/bin")

    def run_installed(self, venv, name, *args):
        return sh(os.path.join(venv, "bin", name), *map(str, args), cwd=self.tmp, env=self.env())

    def assert_stock_elements(self, venv):
        out = self.run_installed(venv, "element-info")
        lines = [line for line in out.splitlines() if not line.startswith(" ")]  # options are indented
        self.assertEqual(STOCK_ELEMENTS, len(lines), out)
        site = os.path.realpath(venv)
        for line in lines:
            path = line.rsplit("[", 1)[1].rstrip("]")
            self.assertTrue(os.path.realpath(path).startswith(site + os.sep), line)
        self.assertNotIn(ROOT, out)

    def test_wheel_installs_working_commands(self):
        wheel = dist(".whl")
        with zipfile.ZipFile(wheel) as z:
            modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
        self.assertIn("imaging_elements/_data/lib/img-functions", modes)
        hook = "imaging_elements/_data/elements/convert-qemu/convert.d/60-raw-to-qemu"
        self.assertTrue(modes[hook] & 0o111, f"{hook} is not executable in the wheel")

        self.assertIn(f"imaging_elements/engine/__pycache__/runner.{sys.implementation.cache_tag}.pyc", modes)
        # --no-compile: the bytecode is the wheel's own, and no process recompiles the package.
        venv = self.venv(["--no-compile", wheel])
        package = sh(os.path.join(venv, "bin", "python"), "-c",
                     "import imaging_elements, os; print(os.path.dirname(imaging_elements.__file__))",
                     cwd=self.tmp, env=self.env()).strip()
        self.assertTrue(package.startswith(os.path.realpath(venv)), package)
        loaded = subprocess.run([os.path.join(venv, "bin", "python"), "-v", "-c",
                                 "import imaging_elements.cli.process, imaging_elements.api"],
                                capture_output=True, text=True, check=True, cwd=self.tmp,
                                env=dict(self.env(), PYTHONDONTWRITEBYTECODE="1")).stderr
        ours = [line for line in loaded.splitlines()
                if line.startswith("# code object from") and os.sep + "imaging_elements" + os.sep in line]
        self.assertGreater(len(ours), 10)
        self.assertEqual([], [line for line in ours if not line.endswith(".pyc'")])
        for name in DRIVERS:
            self.assertIn("usage:", self.run_installed(venv, name, "--help"))
        self.assert_stock_elements(venv)
        self.process_raw_to_qcow2(venv)
        self.bundle_round_trip(venv)

    def test_pip_install_dot(self):
        """`pip install .` of the checkout (not editable), as a new user would."""
        with building():
            venv = self.venv(["wheel"], ["--no-build-isolation", ROOT])
        self.assert_stock_elements(venv)
        elements = sh(os.path.join(venv, "bin", "python"), "-c",
                      "import imaging_elements.engine.resources as r; print(r.ELEMENTS)", cwd=self.tmp, env=self.env())
        self.assertTrue(os.path.realpath(elements.strip()).startswith(os.path.realpath(venv) + os.sep), elements)

    def test_sdist_carries_the_tree(self):
        import tarfile
        with tarfile.open(dist(".tar.gz")) as tar:
            names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        for needed in ("lib/img-functions", "elements/mounters/element-deps", "setup.py", "pyproject.toml",
                       "MANIFEST.in", "LICENSE", "requirements.txt", "tox.ini", "docs/cli.md",
                       "tests/test_package.py", "imaging_elements/engine/resources.py"):
            self.assertIn(needed, names)
        self.assertFalse([n for n in names if "__pycache__" in n])

    def process_raw_to_qcow2(self, venv):
        tree = imagebuild.linux_tree(self.path("tree"), extra={"var/lib/data.bin": os.urandom(2 * MiB)})
        fs = imagebuild.make_fs(self.path("fs.img"), tree, size=16 * MiB, label="rootfs")
        disk = imagebuild.make_disk(self.path("disk.raw"), [{"image": fs, "bootable": True}])
        out = self.path("out.qcow2")
        self.run_installed(venv, "euca-image-process", "-q", "-i", disk, "-o", out, "-T", "qcow2",
                           "mounters", "convert-qemu")
        self.assertIn('"format": "qcow2"', sh("qemu-img", "info", "--output=json", out))
        sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk, out)

    def bundle_round_trip(self, venv):
        for who in ("user", "cloud"):
            sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={who}",
               "-keyout", self.path(f"{who}.pem"), "-out", self.path(f"{who}-cert.pem"))
        image = imagebuild.random_file(self.path("small.img"), 3, seed=15)
        self.run_installed(venv, "euca-bundle-image", "-i", image, "-r", "x86_64", "-u", "111122223333",
                           "-k", self.path("user.pem"), "-c", self.path("user-cert.pem"),
                           "--ec2cert", self.path("cloud-cert.pem"), "-d", self.path("bundle"))
        os.mkdir(self.path("restored"))
        self.run_installed(venv, "euca-unbundle", "-m", self.path("bundle", "small.img.manifest.xml"),
                           "-s", self.path("bundle"), "-d", self.path("restored"), "-k", self.path("cloud.pem"))
        sh("cmp", image, self.path("restored", "small.img"))
