"""Run validator hooks and whole processes in tests, and read back what they said."""

import json
import os
import subprocess
import sys

from tests import base

ELEMENTS = os.path.join(base.ROOT, "elements")


def hook_path(element, name):
    return os.path.join(ELEMENTS, element, "validate.d", name)


def run_hook(path, root, work_dir, verb="run", **env):
    """Run one hook as the runner would; returns (exit code, {describe/warn/fail: [texts]}, output)."""
    status_read, status_write = os.pipe()
    full = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            "PYTHONPATH": base.ROOT, "LANG": "C.UTF-8", "IMG_MOUNT_POINT": root,
            "IMG_WORK_DIR": work_dir, "IMG_PLATFORM": "linux", "IMG_IMAGE_TYPE": "raw",
            "IMG_DISK_TYPE": "raw", "IMG_JOURNAL": os.path.join(work_dir, "journal"),
            "IMG_LIB": os.path.join(base.ROOT, "lib"), "IMG_STATUS_FD": str(status_write)}
    full.update(env)
    process = subprocess.Popen([path, verb], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               pass_fds=(status_write,))
    os.close(status_write)
    with os.fdopen(status_read) as status:
        lines = status.read().splitlines()
    output = process.communicate()[0].decode(errors="replace")
    said = {"describe": [], "warn": [], "fail": []}
    for line in lines:
        (kind, value), = json.loads(line).items()
        said.setdefault(kind, []).append(value)
    return process.returncode, said, output


def write_filesystems(work_dir, entries):
    with open(os.path.join(work_dir, "filesystems.json"), "w") as f:
        json.dump(entries, f)


ROOT_FS = {"index": 1, "start": 1 << 20, "size": 24 << 20, "fstype": "ext4", "label": "rootfs",
           "uuid": "6b5c2a8e-1111-4222-8333-944455556666", "partuuid": "0a0b0c0d-01", "partlabel": None,
           "mountpoint": "/", "root": True}


def process(test, image, *elements, args=(), check=None):
    """euca-image-process over `image`; returns (CompletedProcess, {hook: hook-end event})."""
    status = test.path(f"status-{len(os.listdir(test.tmp))}.jsonl")
    result = test.run_bin("euca-image-process", "-i", image, "--status-file", status, *args, *elements,
                          check=check)
    events = {}
    with open(status) as f:
        for line in f:
            event = json.loads(line)
            if event.get("event") == "hook-end":
                events[event["hook"]] = event
    return result, events
