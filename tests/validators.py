"""Run validator hooks and whole processes in tests, and read back what they said."""

import json
import os

from tests import base, hookcall

ELEMENTS = os.path.join(base.ROOT, "elements")


def hook_path(element, name):
    return os.path.join(ELEMENTS, element, "validate.d", name)


def state(root, work_dir, **env):
    """A process's state for the validators of the guest tree `root` (as if mounted there),
    its work directory `work_dir` (filesystems.json is read there), then `env`."""
    return hookcall.state(work_dir, **{"IMG_MOUNT_POINT": root, "IMG_PLATFORM": "linux", "IMG_IMAGE_TYPE": "raw",
                                       "IMG_DISK_TYPE": "raw", **env})


def run_hook(path, root, work_dir, **env):
    """Run one validate.d hook as a process runs it (tests/hookcall.py); returns (exit code,
    {describe/warn/fail/...: [texts]}, its output)."""
    ran = hookcall.run(hookcall.hook(path, "validate"), state(root, work_dir, **env))
    return ran.code, ran.said, ran.text


def accepts(path, root, work_dir, **env):
    """(accepted, reason) as the runner asks the validator."""
    return hookcall.accepts(hookcall.hook(path, "validate"), state(root, work_dir, **env))


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
