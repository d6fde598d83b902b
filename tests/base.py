"""Shared test fixtures: a leak check and helpers to run the drivers."""

import hashlib
import os
import re
import select
import subprocess
import sys
import time

import fixtures
import testtools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
DATA = os.path.join(ROOT, "tests", "data")


def file_digest(path, algorithm):
    """The hex digest of the bytes of the file at `path` (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _loops():
    out = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout
    return sorted(line for line in out.splitlines() if line)


def _mounts():
    with open("/proc/mounts") as f:
        return sorted(f.read().splitlines())


def _helpers(scope=None):
    """Processes an image process may start: pid and command line; with `scope`,
    only those naming or holding open a file under that directory."""
    found = []
    inodes = _inodes_under(scope) if scope else set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.match(r"\S*(qemu-storage-daemon|qemu-system|qemu-img|ntfs-3g|bwrap)\b", cmd) and \
                (not scope or scope in cmd or holds_files(pid, scope, inodes)):
            found.append((pid, cmd))
    return sorted(found)


def _inodes_under(directory):
    inodes = set()
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            inodes.add((st.st_dev, st.st_ino))
    return inodes


def holds_files(pid, directory, inodes=None):
    """Whether process `pid` has a file under `directory` open.  A confined tool
    sees its files under sandbox names: they are recognised by their inode."""
    inodes = _inodes_under(directory) if inodes is None else inodes
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(directory):
                return True
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            return True
    return False


class LeakCheck(fixtures.Fixture):
    """Fails the test if loop devices, mounts or helper processes outlive it.

    With `scope` (a directory), only resources naming a path under it count,
    so that tests running in parallel do not see each other's resources.
    """

    def __init__(self, scope=None):
        super().__init__()
        self.scope = scope

    def _snapshot(self):
        items = (_loops(), _mounts())
        if self.scope:
            items = tuple([i for i in group if self.scope in str(i)] for group in items)
        return (*items, _helpers(self.scope))

    def _setUp(self):
        self.addCleanup(self._check, self._snapshot())

    def _check(self, before):
        after = self._snapshot()
        for what, old, new in zip(("loop devices", "mounts", "processes"), before, after):
            leaked = sorted(set(map(str, new)) - set(map(str, old)))
            if leaked:
                raise AssertionError(f"leaked {what}: {leaked}")


class TestCase(testtools.TestCase):
    """Base class: a temporary directory and, for root tests, a leak check."""

    needs_root = False

    def setUp(self):
        super().setUp()
        if self.needs_root and os.geteuid() != 0:
            self.skipTest("needs root")
        self.tmp = self.useFixture(fixtures.TempDir()).path
        if self.needs_root:
            self.useFixture(LeakCheck(scope=self.tmp))

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def run_bin(self, name, *args, env=None, check=None, **kwargs):
        """Run a driver from bin/; returns the CompletedProcess (text output)."""
        # TMPDIR: default work directories land in the test's own directory,
        # where the leak check looks and the TempDir fixture cleans up.
        full_env = dict(os.environ, TMPDIR=self.tmp)
        full_env.update(env or {})
        result = subprocess.run([sys.executable, os.path.join(BIN, name), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=full_env, **kwargs)
        if check is not None and result.returncode != check:
            raise AssertionError(f"{name} {' '.join(map(str, args))}: exit {result.returncode}, "
                                 f"expected {check}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result


def read_until(fd, marker, timeout=60):
    """What a pty says until `marker` (None: until it closes)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline and (marker is None or marker not in data):
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data
